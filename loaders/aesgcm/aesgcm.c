/*
 * aesgcm — hotserve's sample custom loader: decrypts AES-256-GCM model files in memory (OpenSSL libcrypto).
 *
 * loader_config_file (JSON, required), one of:
 *   {"key_file": "aes.key"}   32 raw bytes, or 64 hex characters and an optional newline; a relative path is
 *                             relative to the folder of this JSON file. `hotserve keygen FILE` writes one.
 *   {"key_env": "HS_KEY"}     the name of an environment variable holding 64 hex characters.
 *
 * custom_loader_options (paths relative to base_path/<version>/, never absolute, never ".."):
 *   "model_file"   "model.xml.enc" (IR, needs bin_file) or "model.onnx.enc" (ONNX)  — required
 *   "bin_file"     "model.bin.enc"                                                  — IR weights
 *   "enable_file"  a plain-text file; when its first line is DISABLED the version is blacklisted (re-read on
 *                  every hs_loader_blacklist_status call; a missing file or any other content means enabled)
 *
 * Encrypted file format (`hotserve encrypt` writes it):
 *   "HSENC1\0\0" (8 bytes) | u32 little-endian format version = 1 | 12-byte nonce | ciphertext | 16-byte GCM tag
 *   The additional authenticated data is the file's base name (e.g. "model.xml.enc"), so a renamed or swapped
 *   file fails authentication like a tampered one.
 *
 * Secrets: the key lives in one locked, non-dumpable page and is wiped at deinit; decrypted buffers are
 * page-aligned anonymous mappings (mlock best-effort, MADV_DONTDUMP), wiped with OPENSSL_cleanse on release.
 * Messages name files, never key bytes or plaintext.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "../common/hs_common.h"

const uint32_t hs_loader_abi_version = HS_LOADER_ABI_VERSION;

#define KEY_LEN 32
#define NONCE_LEN 12
#define TAG_LEN 16
#define HEADER_LEN (8 + 4 + NONCE_LEN)
#define FORMAT_VERSION 1u
#define CHUNK ((size_t)1 << 30) /* EVP takes int lengths */

static const unsigned char MAGIC[8] = {'H', 'S', 'E', 'N', 'C', '1', 0, 0};

typedef struct mapping {
    uint8_t *data;
    size_t len; /* mapped length, a multiple of the page size */
    struct mapping *next;
} mapping;

typedef struct {
    unsigned char *key; /* KEY_LEN bytes at the start of its own mapping */
    size_t key_len;
    hs_watch *watch;
    mapping *live; /* decrypted buffers not yet released */
    char error[HS_ERR_CAP];
} loader;

static _Thread_local char init_error[HS_ERR_CAP];

/* ---- secret memory ------------------------------------------------------------------------------------ */

static size_t page_round(size_t n)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

/* Page-aligned so that mlock and MADV_DONTDUMP cover exactly this buffer; both are best-effort. */
static uint8_t *secret_map(size_t n, size_t *len)
{
    *len = page_round(n == 0 ? 1 : n);
    void *p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    (void)madvise(p, *len, MADV_DONTDUMP);
    (void)mlock(p, *len);
    return p;
}

static void secret_unmap(uint8_t *p, size_t len)
{
    OPENSSL_cleanse(p, len);
    (void)munlock(p, len);
    (void)munmap(p, len);
}

/* ---- init --------------------------------------------------------------------------------------------- */

static int hex_decode(const char *text, size_t n, unsigned char *out)
{
    for (size_t i = 0; i < n / 2; i++) {
        int hi = -1, lo = -1;
        char a = text[2 * i], b = text[2 * i + 1];
        hi = (a >= '0' && a <= '9') ? a - '0' : (a >= 'a' && a <= 'f') ? a - 'a' + 10 : (a >= 'A' && a <= 'F') ? a - 'A' + 10 : -1;
        lo = (b >= '0' && b <= '9') ? b - '0' : (b >= 'a' && b <= 'f') ? b - 'a' + 10 : (b >= 'A' && b <= 'F') ? b - 'A' + 10 : -1;
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi * 16 + lo);
    }
    return 0;
}

static int key_from_file(loader *L, const char *config_file, const char *key_file)
{
    char path[PATH_MAX];
    if (key_file[0] == '/') {
        if ((size_t)snprintf(path, sizeof path, "%s", key_file) >= sizeof path)
            goto too_long;
    } else {
        const char *slash = strrchr(config_file, '/');
        int dir_len = slash ? (int)(slash - config_file) : 1;
        const char *dir = slash ? config_file : ".";
        if ((size_t)snprintf(path, sizeof path, "%.*s/%s", dir_len, dir, key_file) >= sizeof path)
            goto too_long;
    }
    char *data = NULL;
    size_t len = 0;
    char why[HS_ERR_CAP];
    if (hs_read_small(path, 4096, &data, &len, why) != 0) {
        hs_err(init_error, "loader config %s: key_file: %s", config_file, why);
        return -1;
    }
    int rc = 0;
    size_t n = len;
    if (n == KEY_LEN) {
        memcpy(L->key, data, KEY_LEN);
    } else {
        if (n > 0 && data[n - 1] == '\n')
            n--;
        if (n > 0 && data[n - 1] == '\r')
            n--;
        if (n != 2 * KEY_LEN || hex_decode(data, n, L->key) != 0) {
            hs_err(init_error, "key file %s must hold 32 raw bytes or 64 hex characters (it has %zu bytes)",
                   path, len);
            rc = -1;
        }
    }
    OPENSSL_cleanse(data, len);
    free(data);
    return rc;
too_long:
    hs_err(init_error, "loader config %s: key_file path too long", config_file);
    return -1;
}

static int key_from_env(loader *L, const char *config_file, const char *var)
{
    const char *value = getenv(var);
    if (value == NULL || value[0] == '\0') {
        hs_err(init_error, "loader config %s: environment variable %s (key_env) is not set", config_file, var);
        return -1;
    }
    if (strlen(value) != 2 * KEY_LEN || hex_decode(value, 2 * KEY_LEN, L->key) != 0) {
        hs_err(init_error, "environment variable %s (key_env) must hold 64 hex characters", var);
        return -1;
    }
    return 0;
}

static void free_loader(loader *L)
{
    while (L->live != NULL) {
        mapping *m = L->live;
        L->live = m->next;
        secret_unmap(m->data, m->len);
        free(m);
    }
    hs_watch_free(&L->watch);
    if (L->key != NULL)
        secret_unmap(L->key, L->key_len);
    free(L);
}

int hs_loader_init(const char *loader_config_file, void **handle)
{
    init_error[0] = '\0';
    if (handle == NULL) {
        hs_err(init_error, "hs_loader_init called without a handle pointer");
        return HS_INTERNAL_ERROR;
    }
    *handle = NULL;
    if (loader_config_file == NULL || loader_config_file[0] == '\0') {
        hs_err(init_error, "loader_config_file is required: a JSON file {\"key_file\": PATH} or "
                           "{\"key_env\": VARIABLE}");
        return HS_INTERNAL_ERROR;
    }
    char *text = NULL;
    size_t text_len = 0;
    char why[HS_ERR_CAP];
    if (hs_read_small(loader_config_file, 65536, &text, &text_len, why) != 0) {
        hs_err(init_error, "loader config: %s", why);
        return HS_INTERNAL_ERROR;
    }
    char what[PATH_MAX + 32];
    snprintf(what, sizeof what, "loader config %s", loader_config_file);
    hs_kvs cfg;
    int parsed = hs_json_flat(text, what, &cfg, init_error);
    free(text);
    if (parsed != 0)
        return HS_INTERNAL_ERROR;
    int rc = HS_INTERNAL_ERROR;
    loader *L = NULL;
    for (size_t i = 0; i < cfg.count; i++) {
        if (strcmp(cfg.items[i].key, "key_file") != 0 && strcmp(cfg.items[i].key, "key_env") != 0) {
            hs_err(init_error, "%s: unknown key \"%s\" (expected key_file or key_env)", what, cfg.items[i].key);
            goto out;
        }
    }
    const char *key_file = hs_kvs_get(&cfg, "key_file");
    const char *key_env = hs_kvs_get(&cfg, "key_env");
    if ((key_file == NULL) == (key_env == NULL) || (key_file ? key_file : key_env)[0] == '\0') {
        hs_err(init_error, "%s: expected exactly one of {\"key_file\": PATH} or {\"key_env\": VARIABLE}", what);
        goto out;
    }
    L = calloc(1, sizeof *L);
    if (L == NULL || (L->key = secret_map(KEY_LEN, &L->key_len)) == NULL) {
        hs_err(init_error, "out of memory");
        goto out;
    }
    if ((key_file ? key_from_file(L, loader_config_file, key_file) : key_from_env(L, loader_config_file, key_env)) != 0)
        goto out;
    *handle = L;
    L = NULL;
    rc = HS_OK;
out:
    if (L != NULL)
        free_loader(L);
    hs_kvs_free(&cfg);
    return rc;
}

/* ---- load --------------------------------------------------------------------------------------------- */

static int read_all(int fd, uint8_t *buf, size_t n, off_t at)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, at + (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

/* Decrypt one file into a fresh secret mapping (recorded in L->live). 0, or -1 with why set. */
static int decrypt_file(loader *L, const char *path, hs_buffer *out, char *why)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        hs_err(why, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    uint8_t *plain = NULL;
    size_t plain_map = 0;
    mapping *m = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    unsigned char header[HEADER_LEN];
    unsigned char tag[TAG_LEN];
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        hs_err(why, "%s: not a regular file", path);
        goto fail;
    }
    if ((uint64_t)st.st_size < HEADER_LEN + TAG_LEN) {
        hs_err(why, "%s: too short to be a hotserve encrypted file (%lld bytes)", path, (long long)st.st_size);
        goto fail;
    }
    size_t ct_len = (size_t)st.st_size - HEADER_LEN - TAG_LEN;
    if (read_all(fd, header, HEADER_LEN, 0) != 0 || read_all(fd, tag, TAG_LEN, st.st_size - TAG_LEN) != 0) {
        hs_err(why, "%s: cannot read: %s", path, strerror(errno));
        goto fail;
    }
    if (memcmp(header, MAGIC, sizeof MAGIC) != 0) {
        hs_err(why, "%s: not a hotserve encrypted file (bad magic)", path);
        goto fail;
    }
    uint32_t format = (uint32_t)header[8] | (uint32_t)header[9] << 8 | (uint32_t)header[10] << 16 |
                      (uint32_t)header[11] << 24;
    if (format != FORMAT_VERSION) {
        hs_err(why, "%s: unsupported encrypted file format version %u", path, format);
        goto fail;
    }
    m = calloc(1, sizeof *m);
    plain = secret_map(ct_len, &plain_map);
    if (m == NULL || plain == NULL) {
        hs_err(why, "%s: out of memory for %zu bytes", path, ct_len);
        goto fail;
    }
    if (read_all(fd, plain, ct_len, HEADER_LEN) != 0) {
        hs_err(why, "%s: cannot read: %s", path, strerror(errno));
        goto fail;
    }
    const char *aad = hs_basename(path);
    int outl = 0;
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) != 1 ||
        EVP_DecryptInit_ex(ctx, NULL, NULL, L->key, header + 12) != 1 ||
        EVP_DecryptUpdate(ctx, NULL, &outl, (const unsigned char *)aad, (int)strlen(aad)) != 1) {
        hs_err(why, "%s: OpenSSL could not set up AES-256-GCM", path);
        goto fail;
    }
    for (size_t done = 0; done < ct_len;) { /* in place: GCM allows out == in */
        size_t n = ct_len - done < CHUNK ? ct_len - done : CHUNK;
        if (EVP_DecryptUpdate(ctx, plain + done, &outl, plain + done, (int)n) != 1 || (size_t)outl != n) {
            hs_err(why, "%s: decryption failed", path);
            goto fail;
        }
        done += n;
    }
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) != 1 ||
        EVP_DecryptFinal_ex(ctx, plain + ct_len, &outl) != 1) {
        hs_err(why, "%s: authentication failed (wrong key, tampered file, or renamed/swapped file)", path);
        goto fail;
    }
    EVP_CIPHER_CTX_free(ctx);
    close(fd);
    m->data = plain;
    m->len = plain_map;
    m->next = L->live;
    L->live = m;
    out->data = plain;
    out->size = ct_len;
    return 0;
fail:
    EVP_CIPHER_CTX_free(ctx);
    if (plain != NULL)
        secret_unmap(plain, plain_map);
    free(m);
    close(fd);
    return -1;
}

static void release(loader *L, hs_buffer *buf)
{
    if (buf == NULL || buf->data == NULL)
        return;
    for (mapping **it = &L->live; *it != NULL; it = &(*it)->next) {
        mapping *m = *it;
        if (m->data != buf->data)
            continue;
        *it = m->next;
        secret_unmap(m->data, m->len);
        free(m);
        break;
    }
    buf->data = NULL; /* a pointer this loader does not own is left alone */
    buf->size = 0;
}

static int load(loader *L, const char *name, const char *base, int64_t version, const char *options,
                hs_buffer *model, hs_buffer *weights, char *why)
{
    hs_kvs opts;
    char path[PATH_MAX];
    int rc = HS_MODEL_LOAD_ERROR;
    if (hs_json_flat(options, "custom_loader_options", &opts, why) != 0)
        return HS_MODEL_LOAD_ERROR;
    const char *enable = hs_kvs_get(&opts, "enable_file");
    const char *model_file = hs_kvs_get(&opts, "model_file");
    const char *bin_file = hs_kvs_get(&opts, "bin_file");
    if (enable != NULL) {
        if (hs_version_file(path, base, version, "enable_file", enable, why) != 0)
            goto out;
        if (hs_watch_set(&L->watch, name, version, path) != 0) {
            hs_err(why, "out of memory");
            rc = HS_INTERNAL_ERROR;
            goto out;
        }
        if (hs_is_disabled(path)) {
            hs_err(why, "disabled by enable_file %s (its first line is DISABLED)", path);
            rc = HS_MODEL_BLACKLISTED;
            goto out;
        }
    } else {
        (void)hs_watch_set(&L->watch, name, version, NULL);
    }
    if (model_file == NULL) {
        hs_err(why, "custom_loader_options has no model_file");
        goto out;
    }
    size_t n = strlen(model_file);
    if (n < 5 || strcmp(model_file + n - 4, ".enc") != 0) {
        hs_err(why, "custom_loader_options.model_file \"%s\" must name an encrypted file (*.xml.enc or *.onnx.enc)",
               model_file);
        goto out;
    }
    char plain_name[PATH_MAX];
    snprintf(plain_name, sizeof plain_name, "%.*s", (int)(n - 4), model_file);
    int type = hs_model_type(plain_name);
    if (type < 0) {
        hs_err(why, "custom_loader_options.model_file \"%s\": unknown model type (expected *.xml.enc or *.onnx.enc)",
               model_file);
        goto out;
    }
    if (type == HS_MODEL_TYPE_IR && bin_file == NULL) {
        hs_err(why, "custom_loader_options has no bin_file (an IR model_file needs its weights)");
        goto out;
    }
    if (hs_version_file(path, base, version, "model_file", model_file, why) != 0 ||
        decrypt_file(L, path, model, why) != 0)
        goto out;
    if (type == HS_MODEL_TYPE_IR) {
        if (hs_version_file(path, base, version, "bin_file", bin_file, why) != 0 ||
            decrypt_file(L, path, weights, why) != 0) {
            release(L, model);
            goto out;
        }
    }
    rc = type;
out:
    hs_kvs_free(&opts);
    return rc;
}

int hs_loader_load_model(void *handle, const char *model_name, const char *base_path, int64_t version,
                         const char *options_json, hs_buffer *model, hs_buffer *weights)
{
    loader *L = handle;
    if (L == NULL || model == NULL || weights == NULL)
        return HS_INTERNAL_ERROR;
    L->error[0] = '\0';
    model->data = NULL;
    model->size = 0;
    weights->data = NULL;
    weights->size = 0;
    if (model_name == NULL || base_path == NULL || base_path[0] == '\0' || options_json == NULL) {
        hs_err(L->error, "model name, base_path and options are required");
        return HS_MODEL_LOAD_ERROR;
    }
    return load(L, model_name, base_path, version, options_json, model, weights, L->error);
}

void hs_loader_release(void *handle, hs_buffer *buf)
{
    if (handle != NULL)
        release(handle, buf);
}

int hs_loader_blacklist_status(void *handle, const char *model_name, int64_t version)
{
    loader *L = handle;
    if (L == NULL || model_name == NULL)
        return HS_OK;
    return hs_watch_status(L->watch, model_name, version);
}

/* The enable-file entry stays, so a blacklisted version keeps reporting so after it was unloaded. */
void hs_loader_unload_model(void *handle, const char *model_name, int64_t version)
{
    (void)handle;
    (void)model_name;
    (void)version;
}

void hs_loader_retire_model(void *handle, const char *model_name)
{
    loader *L = handle;
    if (L != NULL && model_name != NULL)
        hs_watch_retire(&L->watch, model_name);
}

void hs_loader_deinit(void *handle)
{
    if (handle != NULL)
        free_loader(handle);
}

const char *hs_loader_last_error(void *handle)
{
    loader *L = handle;
    return L != NULL ? L->error : init_error;
}
