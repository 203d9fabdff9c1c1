"""wordcount in Python (componentize-py): counts words, lines and bytes of
UTF-8 text with exactly the Rust wordcount's output, and counts its calls in
kv."""

import wit_world
from componentize_py_types import Err
from wit_world.imports import kv, log, types

# Unicode White_Space, the set Rust's split_whitespace uses. Python's
# str.split() also splits on U+001C..U+001F, so the set is spelled out.
WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)


def count_call() -> None:
    previous = kv.get("calls")
    n = int(previous.decode()) + 1 if previous else 1
    # kv.set returns result<_, string>: an err is raised as Err.
    kv.set("calls", str(n).encode())
    log.log(log.Level.DEBUG, f"wordcount-py call {n}")


class WitWorld(wit_world.WitWorld):
    def describe(self) -> types.Descriptor:
        return types.Descriptor(
            name="wordcount-py",
            version="0.1.0",
            capabilities=[
                types.Capability(
                    name="text.wordcount",
                    version="1.0.0",
                    description='counts words, lines and bytes of UTF-8 text; returns JSON {"words":N,"lines":N,"bytes":N}',
                )
            ],
        )

    def handle(self, task: types.Task) -> bytes:
        try:
            text = task.payload.decode("utf-8")
        except UnicodeDecodeError:
            raise Err(types.TaskError_InvalidInput("payload is not UTF-8"))
        words = 0
        in_word = False
        for ch in text:
            if ord(ch) in WHITE_SPACE:
                in_word = False
            elif not in_word:
                in_word = True
                words += 1
        lines = task.payload.count(b"\n")
        try:
            count_call()
        except Err as e:
            raise Err(types.TaskError_Retryable(f"kv: {e.value}"))
        return f'{{"words":{words},"lines":{lines},"bytes":{len(task.payload)}}}'.encode()
