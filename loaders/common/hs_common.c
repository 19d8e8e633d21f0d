/* Helpers shared by the loaders: a flat JSON reader, safe paths inside a version folder, enable files. */
#define _GNU_SOURCE
#include "hs_common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void hs_err(char *err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, HS_ERR_CAP, fmt, ap);
    va_end(ap);
}

/* ---- flat JSON ---------------------------------------------------------------------------------------- */

typedef struct {
    const char *s;
    size_t pos;
    const char *what;
    char *err;
} parser;

static void skip_ws(parser *p)
{
    while (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' || p->s[p->pos] == '\r')
        p->pos++;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int read_hex4(parser *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p->s[p->pos + (size_t)i]);
        if (h < 0) {
            hs_err(p->err, "%s: bad \\u escape at offset %zu", p->what, p->pos);
            return -1;
        }
        v = v * 16 + (unsigned)h;
    }
    p->pos += 4;
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* At an opening quote: the unescaped string (malloc'd). The output is never longer than the input. */
static char *read_string(parser *p)
{
    p->pos++; /* the quote */
    size_t cap = strlen(p->s + p->pos) + 1;
    char *out = malloc(cap);
    if (out == NULL) {
        hs_err(p->err, "%s: out of memory", p->what);
        return NULL;
    }
    size_t n = 0;
    for (;;) {
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '\0') {
            hs_err(p->err, "%s: unterminated string", p->what);
            goto fail;
        }
        if (c == '"') {
            p->pos++;
            out[n] = '\0';
            return out;
        }
        if (c < 0x20) {
            hs_err(p->err, "%s: control character in a string at offset %zu", p->what, p->pos);
            goto fail;
        }
        if (c != '\\') {
            out[n++] = (char)c;
            p->pos++;
            continue;
        }
        char e = p->s[p->pos + 1];
        p->pos += 2;
        switch (e) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (read_hex4(p, &cp) != 0)
                goto fail;
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                hs_err(p->err, "%s: lone low surrogate at offset %zu", p->what, p->pos);
                goto fail;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    hs_err(p->err, "%s: lone high surrogate at offset %zu", p->what, p->pos);
                    goto fail;
                }
                p->pos += 2;
                if (read_hex4(p, &lo) != 0)
                    goto fail;
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    hs_err(p->err, "%s: bad surrogate pair at offset %zu", p->what, p->pos);
                    goto fail;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp == 0) {
                hs_err(p->err, "%s: \\u0000 is not allowed in a string", p->what);
                goto fail;
            }
            n += put_utf8(out + n, cp);
            break;
        }
        default:
            hs_err(p->err, "%s: bad escape at offset %zu", p->what, p->pos - 1);
            goto fail;
        }
    }
fail:
    free(out);
    return NULL;
}

/* A number, true, false or null, kept as text. */
static char *read_scalar(parser *p)
{
    size_t start = p->pos;
    while (p->s[p->pos] != '\0' && strchr("+-.0123456789eEtruefalsn", p->s[p->pos]) != NULL)
        p->pos++;
    size_t len = p->pos - start;
    const char *tok = p->s + start;
    int ok = (len == 4 && strncmp(tok, "true", 4) == 0) || (len == 5 && strncmp(tok, "false", 5) == 0) ||
             (len == 4 && strncmp(tok, "null", 4) == 0);
    if (!ok && len > 0 && (tok[0] == '-' || (tok[0] >= '0' && tok[0] <= '9'))) {
        char *copy = strndup(tok, len);
        char *end = NULL;
        if (copy == NULL) {
            hs_err(p->err, "%s: out of memory", p->what);
            return NULL;
        }
        (void)strtod(copy, &end);
        ok = end != NULL && *end == '\0';
        free(copy);
    }
    if (!ok) {
        hs_err(p->err, "%s: expected a string or scalar value at offset %zu", p->what, start);
        return NULL;
    }
    char *out = strndup(tok, len);
    if (out == NULL)
        hs_err(p->err, "%s: out of memory", p->what);
    return out;
}

void hs_kvs_free(hs_kvs *kvs)
{
    for (size_t i = 0; i < kvs->count; i++) {
        free(kvs->items[i].key);
        free(kvs->items[i].value);
    }
    free(kvs->items);
    kvs->items = NULL;
    kvs->count = 0;
}

const char *hs_kvs_get(const hs_kvs *kvs, const char *key)
{
    for (size_t i = 0; i < kvs->count; i++)
        if (strcmp(kvs->items[i].key, key) == 0)
            return kvs->items[i].value;
    return NULL;
}

int hs_json_flat(const char *text, const char *what, hs_kvs *out, char *err)
{
    parser p = {text, 0, what, err};
    out->items = NULL;
    out->count = 0;
    if (text == NULL) {
        hs_err(err, "%s: missing", what);
        return -1;
    }
    skip_ws(&p);
    if (text[p.pos] != '{') {
        hs_err(err, "%s: expected a JSON object", what);
        return -1;
    }
    p.pos++;
    skip_ws(&p);
    if (text[p.pos] == '}') {
        p.pos++;
        goto end;
    }
    for (;;) {
        skip_ws(&p);
        if (text[p.pos] != '"') {
            hs_err(err, "%s: expected a key at offset %zu", what, p.pos);
            goto fail;
        }
        char *key = read_string(&p);
        if (key == NULL)
            goto fail;
        if (hs_kvs_get(out, key) != NULL) {
            hs_err(err, "%s: duplicate key \"%s\"", what, key);
            free(key);
            goto fail;
        }
        skip_ws(&p);
        if (text[p.pos] != ':') {
            hs_err(err, "%s: expected ':' after key \"%s\"", what, key);
            free(key);
            goto fail;
        }
        p.pos++;
        skip_ws(&p);
        char *value;
        if (text[p.pos] == '"') {
            value = read_string(&p);
        } else if (text[p.pos] == '{' || text[p.pos] == '[') {
            hs_err(err, "%s: key \"%s\": nested objects and arrays are not supported", what, key);
            value = NULL;
        } else {
            value = read_scalar(&p);
        }
        if (value == NULL) {
            free(key);
            goto fail;
        }
        hs_kv *grown = realloc(out->items, (out->count + 1) * sizeof *grown);
        if (grown == NULL) {
            hs_err(err, "%s: out of memory", what);
            free(key);
            free(value);
            goto fail;
        }
        out->items = grown;
        out->items[out->count].key = key;
        out->items[out->count].value = value;
        out->count++;
        skip_ws(&p);
        if (text[p.pos] == ',') {
            p.pos++;
            continue;
        }
        if (text[p.pos] == '}') {
            p.pos++;
            break;
        }
        hs_err(err, "%s: expected ',' or '}' at offset %zu", what, p.pos);
        goto fail;
    }
end:
    skip_ws(&p);
    if (text[p.pos] != '\0') {
        hs_err(err, "%s: unexpected text after the object at offset %zu", what, p.pos);
        goto fail;
    }
    return 0;
fail:
    hs_kvs_free(out);
    return -1;
}

/* ---- paths -------------------------------------------------------------------------------------------- */

static int has_dotdot(const char *rel)
{
    const char *s = rel;
    while (*s != '\0') {
        const char *slash = strchr(s, '/');
        size_t len = slash ? (size_t)(slash - s) : strlen(s);
        if (len == 2 && s[0] == '.' && s[1] == '.')
            return 1;
        if (slash == NULL)
            break;
        s = slash + 1;
    }
    return 0;
}

int hs_version_file(char *out, const char *base_path, int64_t version, const char *field, const char *rel, char *err)
{
    char dir[PATH_MAX];
    char real_dir[PATH_MAX];
    char real_file[PATH_MAX];
    if (rel == NULL || rel[0] == '\0') {
        hs_err(err, "custom_loader_options.%s is empty", field);
        return -1;
    }
    if (rel[0] == '/') {
        hs_err(err, "custom_loader_options.%s \"%s\" must be relative to the version folder", field, rel);
        return -1;
    }
    if (has_dotdot(rel)) {
        hs_err(err, "custom_loader_options.%s \"%s\" must not leave the version folder (\"..\")", field, rel);
        return -1;
    }
    int n = snprintf(dir, sizeof dir, "%s/%lld", base_path, (long long)version);
    if (n < 0 || (size_t)n >= sizeof dir || (size_t)snprintf(out, PATH_MAX, "%s/%s", dir, rel) >= PATH_MAX) {
        hs_err(err, "custom_loader_options.%s: path too long", field);
        return -1;
    }
    if (realpath(dir, real_dir) == NULL) {
        hs_err(err, "version folder %s: %s", dir, strerror(errno));
        return -1;
    }
    if (realpath(out, real_file) == NULL)
        return 0; /* missing: the caller decides whether that is an error */
    size_t dl = strlen(real_dir);
    if (strncmp(real_file, real_dir, dl) != 0 || real_file[dl] != '/') {
        hs_err(err, "custom_loader_options.%s \"%s\" resolves outside the version folder %s", field, rel, dir);
        return -1;
    }
    return 0;
}

int hs_read_small(const char *path, size_t max, char **data, size_t *len, char *err)
{
    *data = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        hs_err(err, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        hs_err(err, "%s is not a regular file", path);
        close(fd);
        return -1;
    }
    if ((uint64_t)st.st_size > max) {
        hs_err(err, "%s is too large (%lld bytes, at most %zu)", path, (long long)st.st_size, max);
        close(fd);
        return -1;
    }
    char *buf = malloc((size_t)st.st_size + 1);
    if (buf == NULL) {
        hs_err(err, "out of memory reading %s", path);
        close(fd);
        return -1;
    }
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            hs_err(err, "cannot read %s: %s", path, r < 0 ? strerror(errno) : "unexpected end of file");
            free(buf);
            close(fd);
            return -1;
        }
        got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    *data = buf;
    *len = got;
    return 0;
}

int hs_is_disabled(const char *path)
{
    char line[64];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t r = read(fd, line, sizeof line - 1);
    close(fd);
    if (r <= 0)
        return 0;
    line[r] = '\0';
    size_t n = strcspn(line, "\n");
    while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        n--;
    return n == 8 && memcmp(line, "DISABLED", 8) == 0;
}

const char *hs_basename(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

int hs_model_type(const char *name)
{
    const char *dot = strrchr(hs_basename(name), '.');
    if (dot == NULL)
        return -1;
    if (strcmp(dot, ".xml") == 0)
        return HS_MODEL_TYPE_IR;
    if (strcmp(dot, ".onnx") == 0)
        return HS_MODEL_TYPE_ONNX;
    return -1;
}

/* ---- enable files ------------------------------------------------------------------------------------- */

struct hs_watch {
    char *model;
    int64_t version;
    char *path;
    struct hs_watch *next;
};

int hs_watch_set(hs_watch **head, const char *model, int64_t version, const char *path)
{
    for (hs_watch **it = head; *it != NULL; it = &(*it)->next) {
        hs_watch *w = *it;
        if (w->version != version || strcmp(w->model, model) != 0)
            continue;
        if (path == NULL) {
            *it = w->next;
            free(w->model);
            free(w->path);
            free(w);
            return 0;
        }
        char *copy = strdup(path);
        if (copy == NULL)
            return -1;
        free(w->path);
        w->path = copy;
        return 0;
    }
    if (path == NULL)
        return 0;
    hs_watch *w = calloc(1, sizeof *w);
    if (w == NULL)
        return -1;
    w->model = strdup(model);
    w->path = strdup(path);
    w->version = version;
    if (w->model == NULL || w->path == NULL) {
        free(w->model);
        free(w->path);
        free(w);
        return -1;
    }
    w->next = *head;
    *head = w;
    return 0;
}

int hs_watch_status(const hs_watch *head, const char *model, int64_t version)
{
    for (const hs_watch *w = head; w != NULL; w = w->next)
        if (w->version == version && strcmp(w->model, model) == 0)
            return hs_is_disabled(w->path) ? HS_MODEL_BLACKLISTED : HS_OK;
    return HS_OK;
}

void hs_watch_retire(hs_watch **head, const char *model)
{
    hs_watch **it = head;
    while (*it != NULL) {
        hs_watch *w = *it;
        if (strcmp(w->model, model) == 0) {
            *it = w->next;
            free(w->model);
            free(w->path);
            free(w);
        } else {
            it = &w->next;
        }
    }
}

void hs_watch_free(hs_watch **head)
{
    while (*head != NULL) {
        hs_watch *w = *head;
        *head = w->next;
        free(w->model);
        free(w->path);
        free(w);
    }
}
