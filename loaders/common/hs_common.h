/* Helpers shared by the loaders in this folder (compiled into each library, hidden from its exports). */
#ifndef HS_COMMON_H
#define HS_COMMON_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include "../hotserve_loader.h"

#define HS_ERR_CAP 1024

/* err: a buffer of HS_ERR_CAP bytes; messages are truncated to fit. */
void hs_err(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A flat JSON object {"k": "v", ...}: string values are unescaped, scalar values (numbers, true, false, null)
 * are kept as their text; nested objects and arrays, duplicate keys and NUL characters are rejected. */
typedef struct {
    char *key;
    char *value;
} hs_kv;

typedef struct {
    hs_kv *items;
    size_t count;
} hs_kvs;

/* what: how the text is named in error messages ("custom_loader_options", "loader config /x.json"). 0 or -1. */
int hs_json_flat(const char *text, const char *what, hs_kvs *out, char *err);
const char *hs_kvs_get(const hs_kvs *kvs, const char *key);
void hs_kvs_free(hs_kvs *kvs);

/* out (PATH_MAX bytes) = base_path/<version>/<rel>, where rel comes from custom_loader_options.<field>.
 * Rejects empty, absolute and ".." paths and, when the file exists, a real path outside the version folder.
 * Returns 0 (the file may not exist) or -1 with err set. */
int hs_version_file(char *out, const char *base_path, int64_t version, const char *field, const char *rel, char *err);

/* The whole file as a NUL-terminated string of at most max bytes (the caller frees it). 0 or -1 with err set. */
int hs_read_small(const char *path, size_t max, char **data, size_t *len, char *err);

/* 1 when the file's first line is DISABLED (trailing blanks and CR ignored); 0 when missing or anything else. */
int hs_is_disabled(const char *path);

/* (model, version) -> enable_file, for hs_loader_blacklist_status. */
typedef struct hs_watch hs_watch;
/* path NULL removes the entry. 0 or -1 (out of memory). */
int hs_watch_set(hs_watch **head, const char *model, int64_t version, const char *path);
int hs_watch_status(const hs_watch *head, const char *model, int64_t version);
void hs_watch_retire(hs_watch **head, const char *model);
void hs_watch_free(hs_watch **head);

/* The plaintext model type from a file name: "model.xml" -> IR, "model.onnx" -> ONNX, else -1. */
int hs_model_type(const char *name);

/* The last path component. */
const char *hs_basename(const char *path);

#endif
