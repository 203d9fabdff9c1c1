// Test fixture in C: one capability per way an agent can misbehave, for the
// cross-language conformance suite.
//   test.echo   returns the payload (for per-task cost measurements)
//   test.spin   loops forever
//   test.hog    allocates 1 MiB blocks: N of them for payload "N", else until
//               malloc fails, then aborts like an out-of-memory runtime would
//   test.throw  writes the payload to stderr and aborts (C has no exceptions)
//   test.fail   returns the `failed` task-error with the payload as message
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

static void cap(orch_agent_types_capability_t *c, const char *name, const char *description) {
    agent_string_dup(&c->name, name);
    agent_string_dup(&c->version, "1.0.0");
    agent_string_dup(&c->description, description);
}

void exports_agent_describe(agent_descriptor_t *ret) {
    orch_agent_types_capability_t *caps = malloc(5 * sizeof *caps);
    cap(&caps[0], "test.echo", "returns the payload");
    cap(&caps[1], "test.spin", "loops forever");
    cap(&caps[2], "test.hog", "allocates memory");
    cap(&caps[3], "test.throw", "aborts with a message");
    cap(&caps[4], "test.fail", "returns a failed task-error");
    agent_string_dup(&ret->name, "fixture-c");
    agent_string_dup(&ret->version, "0.1.0");
    ret->capabilities.ptr = caps;
    ret->capabilities.len = 5;
}

static bool is(const agent_string_t *s, const char *want) {
    return s->len == strlen(want) && memcmp(s->ptr, want, s->len) == 0;
}

bool exports_agent_handle(agent_task_t *task, agent_list_u8_t *ret, agent_task_error_t *err) {
    // The payload as a NUL-terminated string, for the cases that read text.
    char *text = malloc(task->payload.len + 1);
    memcpy(text, task->payload.ptr, task->payload.len);
    text[task->payload.len] = 0;

    if (is(&task->capability, "test.echo")) {
        // Hand the payload buffer over as the result; the host frees it.
        *ret = task->payload;
        task->payload.ptr = NULL;
        task->payload.len = 0;
        agent_task_free(task);
        free(text);
        return true;
    }
    if (is(&task->capability, "test.spin")) {
        volatile uint32_t x = (uint32_t)task->payload.len;
        for (;;) x = x * 1103515245u + 12345u;
    }
    if (is(&task->capability, "test.hog")) {
        char *end;
        unsigned long limit = strtoul(text, &end, 10);
        if (end == text || *end != 0) limit = (unsigned long)-1;
        unsigned long got = 0;
        while (got < limit) {
            volatile char *block = malloc(1 << 20);
            if (!block) {
                fprintf(stderr, "out of memory after %lu MiB\n", got);
                abort();
            }
            block[(1 << 20) - 1] = 1;
            got++;
        }
        char *out = malloc(32);
        ret->len = (size_t)snprintf(out, 32, "%lu", got);
        ret->ptr = (uint8_t *)out;
        agent_task_free(task);
        free(text);
        return true;
    }
    if (is(&task->capability, "test.throw")) {
        fprintf(stderr, "%s\n", text);
        abort();
    }
    if (is(&task->capability, "test.fail")) {
        err->tag = ORCH_AGENT_TYPES_TASK_ERROR_FAILED;
        agent_string_dup(&err->val.failed, text);
    } else {
        err->tag = ORCH_AGENT_TYPES_TASK_ERROR_INVALID_INPUT;
        agent_string_dup(&err->val.invalid_input, "unknown capability");
    }
    agent_task_free(task);
    free(text);
    return false;
}
