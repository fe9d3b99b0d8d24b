/* The frames of banger-agent's protocol (docs/agent-protocol.md), as bytes: the frame
 * being built in out[] (begin, put_*), the fields of one that came (next_field and the
 * lookups over it), and the text rule of the wire (UTF-8). Sending is banger-agent.c's
 * (send_frame: the channel). */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "agent.h"

uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* The frame being built lives in out[]; a body goes at out + HDR. */
void begin(void) { outlen = HDR; }

void put_field(int tag, const void *v, size_t n) {
    if (outlen + 5 + n > sizeof out)
        return;                  /* callers stay under MAX_BODY; never overflow */
    out[outlen] = (unsigned char)tag;
    put32(out + outlen + 1, (uint32_t)n);
    memcpy(out + outlen + 5, v, n);
    outlen += 5 + n;
}

void put_i64(int tag, int64_t v) {
    unsigned char b[8];
    for (int i = 7; i >= 0; i--, v = (int64_t)((uint64_t)v >> 8))
        b[i] = (unsigned char)v;
    put_field(tag, b, 8);
}

void put_str(int tag, const char *s) { put_field(tag, s, strlen(s)); }

/* The length of the valid UTF-8 sequence at s (1..4), or 0 (as Python's decoder:
 * no overlong forms, no surrogates, nothing over U+10FFFF). */
static int utf8_seq(const unsigned char *s) {
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    int n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
            : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (!n)
        return 0;
    unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
    unsigned hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (int i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return n;
}

void utf8_clean(char *s) {
    unsigned char *u = (unsigned char *)s;
    while (*u) {
        int n = utf8_seq(u);
        if (n)
            u += n;
        else
            *u++ = '?';
    }
}

bool credit_field(uint32_t chan, const unsigned char *b, size_t n, int64_t *x) {
    if (int_field(b, n, 1, x) && *x > 0 && *x <= (1LL << 40))
        return true;
    send_error(ERROR, chan, "CREDIT needs BYTES, an i64 in 1..2^40");
    return false;
}

/* ---- fields --------------------------------------------------------------------- */

/* 1: a field (tag, value, length); 0: the end; -1: truncated (the frame is malformed). */
int next_field(struct fields *f, int *tag, const unsigned char **v, uint32_t *n) {
    if (f->p == f->end)
        return 0;
    if (f->end - f->p < 5)
        return -1;
    *tag = f->p[0];
    *n = be32(f->p + 1);
    if (*n > (size_t)(f->end - f->p - 5))
        return -1;
    *v = f->p + 5;
    f->p += 5 + *n;
    return 1;
}

bool well_formed(const unsigned char *b, size_t n) {
    struct fields f = {b, b + n};
    int tag, r;
    const unsigned char *v;
    uint32_t len;
    while ((r = next_field(&f, &tag, &v, &len)) == 1) {}
    return r == 0;
}

bool as_i64(const unsigned char *v, uint32_t n, int64_t *x) {
    if (n != 8)
        return false;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++)
        u = u << 8 | v[i];
    *x = (int64_t)u;
    return true;
}

/* The first field with that tag; false if absent. */
bool find_field(const unsigned char *b, size_t n, int want, const unsigned char **v,
                       uint32_t *len) {
    struct fields f = {b, b + n};
    int tag;
    while (next_field(&f, &tag, v, len) == 1)
        if (tag == want)
            return true;
    return false;
}

/* The first integer field with that tag; false if absent or not 8 bytes. */
bool int_field(const unsigned char *b, size_t n, int want, int64_t *x) {
    const unsigned char *v;
    uint32_t len;
    return find_field(b, n, want, &v, &len) && as_i64(v, len, x);
}
