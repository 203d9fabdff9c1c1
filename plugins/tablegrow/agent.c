// Test fixture in C: grows a table. Payload "N": one `table.grow` of N
// elements on the function table; returns the table's old size, or -1 when
// the grow was refused without a trap. (clang 19 has table builtins only
// for externref tables, which need wasmtime's GC; hence the assembly.)
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

__asm__(".tabletype __indirect_function_table, funcref\n");

static int table_grow(int n) {
    int old;
    __asm__ volatile(
        "ref.null_func\n\t"
        "local.get %1\n\t"
        "table.grow __indirect_function_table\n\t"
        "local.set %0"
        : "=r"(old)
        : "r"(n));
    return old;
}

void exports_agent_describe(agent_descriptor_t *ret) {
    orch_agent_types_capability_t *caps = malloc(sizeof *caps);
    agent_string_dup(&caps[0].name, "test.table");
    agent_string_dup(&caps[0].version, "1.0.0");
    agent_string_dup(&caps[0].description, "grows a table by N elements");
    agent_string_dup(&ret->name, "tablegrow");
    agent_string_dup(&ret->version, "0.1.0");
    ret->capabilities.ptr = caps;
    ret->capabilities.len = 1;
}

bool exports_agent_handle(agent_task_t *task, agent_list_u8_t *ret, agent_task_error_t *err) {
    char text[32] = {0};
    size_t n = task->payload.len < sizeof text - 1 ? task->payload.len : sizeof text - 1;
    memcpy(text, task->payload.ptr, n);
    agent_task_free(task);
    int old = table_grow(atoi(text));
    char *out = malloc(16);
    ret->len = (size_t)snprintf(out, 16, "%d", old);
    ret->ptr = (uint8_t *)out;
    (void)err;
    return true;
}
