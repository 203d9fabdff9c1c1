"""Test fixture in Python: one capability per way an agent can misbehave, for
the cross-language conformance suite.
  test.echo   returns the payload (for per-task cost measurements)
  test.spin   loops forever
  test.hog    allocates 1 MiB blocks: N of them for payload "N", else until it fails
  test.throw  raises an exception whose message is the payload (uncaught)
  test.fail   returns the `failed` task-error with the payload as message"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import types


def cap(name: str, description: str) -> types.Capability:
    return types.Capability(name=name, version="1.0.0", description=description)


class WitWorld(wit_world.WitWorld):
    def describe(self) -> types.Descriptor:
        return types.Descriptor(
            name="fixture-py",
            version="0.1.0",
            capabilities=[
                cap("test.echo", "returns the payload"),
                cap("test.spin", "loops forever"),
                cap("test.hog", "allocates memory"),
                cap("test.throw", "raises an exception"),
                cap("test.fail", "returns a failed task-error"),
            ],
        )

    def handle(self, task: types.Task) -> bytes:
        if task.capability == "test.echo":
            return task.payload
        text = task.payload.decode("utf-8", "replace")
        if task.capability == "test.spin":
            x = len(task.payload)
            while True:
                x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        if task.capability == "test.hog":
            limit = int(text) if text.isdigit() else None
            blocks = []
            while limit is None or len(blocks) < limit:
                block = bytearray(1 << 20)
                block[-1] = 1
                blocks.append(block)
            return str(len(blocks)).encode()
        if task.capability == "test.throw":
            raise RuntimeError(text)
        if task.capability == "test.fail":
            raise Err(types.TaskError_Failed(text))
        raise Err(types.TaskError_InvalidInput(f"unknown capability {task.capability}"))
