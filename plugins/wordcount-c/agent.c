// wordcount in C (wit-bindgen C + wasi-libc): counts words, lines and bytes of
// UTF-8 text with exactly the Rust wordcount's output, and counts its calls
// in kv.
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

// Decodes one UTF-8 sequence at s[*i]; returns the code point or -1 when the
// bytes are not valid UTF-8 (stray or cut-off bytes, overlong encodings,
// surrogates, or values past U+10FFFF).
static int32_t next_code_point(const uint8_t *s, size_t len, size_t *i) {
    uint8_t b = s[*i];
    int32_t cp;
    size_t n;
    if (b < 0x80) { *i += 1; return b; }
    else if (b >= 0xc2 && b <= 0xdf) { cp = b & 0x1f; n = 1; }
    else if (b >= 0xe0 && b <= 0xef) { cp = b & 0x0f; n = 2; }
    else if (b >= 0xf0 && b <= 0xf4) { cp = b & 0x07; n = 3; }
    else return -1;
    if (n >= len - *i) return -1;  // the sequence is cut off
    for (size_t k = 1; k <= n; k++) {
        uint8_t c = s[*i + k];
        if ((c & 0xc0) != 0x80) return -1;
        cp = (cp << 6) | (c & 0x3f);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return -1;
    *i += n + 1;
    return cp;
}

// Unicode White_Space, the set Rust's split_whitespace uses.
static bool is_white_space(int32_t c) {
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000;
}

static void set_string(agent_string_t *out, const char *s) { agent_string_dup(out, s); }

static void log_line(orch_agent_log_level_t level, const char *message) {
    agent_string_t m;
    agent_string_set(&m, message);
    orch_agent_log_log(level, &m);
}

// Reads the call counter from kv, stores it plus one. Returns false and sets
// *err when the host refuses the write.
static bool count_call(agent_string_t *err) {
    agent_string_t key;
    agent_string_set(&key, "calls");
    agent_list_u8_t old;
    unsigned long n = 1;
    if (orch_agent_kv_get(&key, &old)) {
        char buf[32] = {0};
        memcpy(buf, old.ptr, old.len < sizeof buf - 1 ? old.len : sizeof buf - 1);
        n = strtoul(buf, NULL, 10) + 1;
        agent_list_u8_free(&old);
    }
    char text[32];
    int len = snprintf(text, sizeof text, "%lu", n);
    agent_list_u8_t value = {(uint8_t *)text, (size_t)len};
    if (!orch_agent_kv_set(&key, &value, err)) return false;
    char message[64];
    snprintf(message, sizeof message, "wordcount-c call %lu", n);
    log_line(ORCH_AGENT_LOG_LEVEL_DEBUG, message);
    return true;
}

void exports_agent_describe(agent_descriptor_t *ret) {
    orch_agent_types_capability_t *cap = malloc(sizeof *cap);
    set_string(&cap->name, "text.wordcount");
    set_string(&cap->version, "1.0.0");
    set_string(&cap->description,
               "counts words, lines and bytes of UTF-8 text; returns JSON {\"words\":N,\"lines\":N,\"bytes\":N}");
    set_string(&ret->name, "wordcount-c");
    set_string(&ret->version, "0.1.0");
    ret->capabilities.ptr = cap;
    ret->capabilities.len = 1;
}

bool exports_agent_handle(agent_task_t *task, agent_list_u8_t *ret, agent_task_error_t *err) {
    const uint8_t *s = task->payload.ptr;
    size_t len = task->payload.len;
    size_t words = 0, lines = 0, i = 0;
    bool in_word = false;
    while (i < len) {
        if (s[i] == '\n') lines++;
        int32_t c = next_code_point(s, len, &i);
        if (c < 0) {
            agent_task_free(task);
            err->tag = ORCH_AGENT_TYPES_TASK_ERROR_INVALID_INPUT;
            set_string(&err->val.invalid_input, "payload is not UTF-8");
            return false;
        }
        if (is_white_space(c)) {
            in_word = false;
        } else if (!in_word) {
            in_word = true;
            words++;
        }
    }
    agent_task_free(task);
    agent_string_t kv_err;
    if (!count_call(&kv_err)) {
        err->tag = ORCH_AGENT_TYPES_TASK_ERROR_RETRYABLE;
        err->val.retryable = kv_err;
        return false;
    }
    char *out = malloc(96);
    int n = snprintf(out, 96, "{\"words\":%zu,\"lines\":%zu,\"bytes\":%zu}", words, lines, len);
    ret->ptr = (uint8_t *)out;
    ret->len = (size_t)n;
    return true;
}
