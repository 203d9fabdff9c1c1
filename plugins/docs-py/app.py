"""The document pipeline of the workflow example (plugins/workflows/
pipeline.toml), in Python: text.split cuts a UTF-8 document into sections
at Markdown headings (or blank lines), and text.aggregate adds up the word
counts of the sections, as text.wordcount returns them."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import types

# Most sections one split returns: each becomes a task of the fan-out.
MAX_SECTIONS = 1000


def split(text: str) -> list:
    sections, title, lines = [], None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("#"):
            if title is not None or "".join(lines).strip():
                sections.append({"title": title or "preamble", "text": "".join(lines)})
            title, lines = line.lstrip("#").strip(), [line]
        else:
            lines.append(line)
    if title is not None or "".join(lines).strip():
        sections.append({"title": title or "preamble", "text": "".join(lines)})
    if len(sections) == 1 and title is None:
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        sections = [{"title": f"paragraph {i + 1}", "text": p} for i, p in enumerate(paragraphs)]
    return sections


class WitWorld(wit_world.WitWorld):
    def describe(self) -> types.Descriptor:
        return types.Descriptor(
            name="docs-py",
            version="0.1.0",
            capabilities=[
                types.Capability(
                    name="text.split",
                    version="1.0.0",
                    description='splits a UTF-8 document into sections; returns JSON {"titles":[...],"sections":[text,...]}',
                ),
                types.Capability(
                    name="text.aggregate",
                    version="1.0.0",
                    description='adds up {"counts":[{"words","lines","bytes"},...],"titles":[...]}; returns totals and per-section words',
                ),
            ],
        )

    def handle(self, task: types.Task) -> bytes:
        try:
            text = task.payload.decode("utf-8")
        except UnicodeDecodeError:
            raise Err(types.TaskError_InvalidInput("payload is not UTF-8"))
        if task.capability == "text.split":
            sections = split(text)
            if len(sections) > MAX_SECTIONS:
                raise Err(types.TaskError_InvalidInput(f"{len(sections)} sections, past {MAX_SECTIONS}"))
            out = {"titles": [s["title"] for s in sections], "sections": [s["text"] for s in sections]}
            return json.dumps(out).encode()
        if task.capability == "text.aggregate":
            try:
                doc = json.loads(text)
                counts, titles = doc["counts"], doc.get("titles") or []
                total = {k: sum(int(c[k]) for c in counts) for k in ("words", "lines", "bytes")}
            except (ValueError, KeyError, TypeError) as e:
                raise Err(types.TaskError_InvalidInput(f"expected {{\"counts\": [...]}}: {e}"))
            words = {t: c["words"] for t, c in zip(titles, counts)}
            return json.dumps({"total": total, "words_by_section": words}).encode()
        raise Err(types.TaskError_InvalidInput(f"docs-py does not serve {task.capability}"))
