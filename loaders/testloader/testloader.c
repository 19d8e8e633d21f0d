/*
 * testloader — a custom loader for hotserve's tests: no crypto, plaintext files, counters, and misbehaviour
 * on request.
 *
 * loader_config_file (optional, plain text, one directive per line):
 *   FAIL_INIT            hs_loader_init fails (anywhere in the file)
 *   CALL_LOG /abs/path   append "<call> <model> <version>" for every call (for tests that run a server process)
 *
 * custom_loader_options (paths relative to base_path/<version>/, as in the aesgcm sample):
 *   "model_file"   model.xml (IR, needs bin_file) or model.onnx (ONNX)
 *   "bin_file"     model.bin
 *   "enable_file"  first line DISABLED -> blacklisted (at load and in hs_loader_blacklist_status)
 *   "mode"         misbehave (or set HS_TESTLOADER_MODE in the environment; the option wins):
 *                  load_error | internal_error | blacklisted     return that status
 *                  null_buffer    return HS_MODEL_TYPE_IR with model {NULL, 0} (weights filled)
 *                  empty_buffer   return HS_MODEL_TYPE_IR with a non-NULL model of size 0
 *                  oversize       return HS_MODEL_TYPE_IR with a model size of 5 GiB (the real buffer is small)
 *                  bad_status     return 42 with both buffers filled
 *   "delay_ms"     sleep this long in hs_loader_load_model
 *   "hold_file"    an absolute path: hs_loader_load_model waits while this file exists (a test deletes it to let
 *                  the load go on; for tests that run a server process, where the in-process gate cannot reach)
 *
 * Exported for in-process tests: int64_t hs_test_counter(const char *name) for "init", "load_model",
 * "release", "blacklist_status", "unload_model", "retire_model", "deinit" (calls) and "live_buffers" (buffers
 * handed out and not yet released); void hs_test_reset(void); const char *hs_test_last_options(void).
 * The gate pauses hs_loader_load_model at its start, deterministically: hs_test_gate_close(), then calls block
 * until hs_test_gate_open(); int hs_test_gate_waiting(void) says how many are blocked right now.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../common/hs_common.h"

const uint32_t hs_loader_abi_version = HS_LOADER_ABI_VERSION;

#define HS_TEST_EXPORT __attribute__((visibility("default")))

enum { C_INIT, C_LOAD, C_RELEASE, C_BLACKLIST, C_UNLOAD, C_RETIRE, C_DEINIT, C_LIVE, C_COUNT };
static const char *const COUNTER_NAMES[C_COUNT] = {"init",         "load_model",   "release", "blacklist_status",
                                                   "unload_model", "retire_model", "deinit",  "live_buffers"};
static int64_t counters[C_COUNT];
static char last_options[4096];

#define ALLOC_MAGIC 0x4853544553544255ull /* the header before every buffer: magic, real size */

typedef struct {
    char call_log[PATH_MAX];
    hs_watch *watch;
    char error[HS_ERR_CAP];
} loader;

static _Thread_local char init_error[HS_ERR_CAP];

static void count(int which, int64_t by)
{
    __atomic_fetch_add(&counters[which], by, __ATOMIC_SEQ_CST);
}

HS_TEST_EXPORT int64_t hs_test_counter(const char *name)
{
    for (int i = 0; i < C_COUNT; i++)
        if (strcmp(name, COUNTER_NAMES[i]) == 0)
            return __atomic_load_n(&counters[i], __ATOMIC_SEQ_CST);
    return -1;
}

HS_TEST_EXPORT void hs_test_reset(void)
{
    for (int i = 0; i < C_COUNT; i++)
        __atomic_store_n(&counters[i], 0, __ATOMIC_SEQ_CST);
    last_options[0] = '\0';
}

static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_closed, gate_waiting;

HS_TEST_EXPORT void hs_test_gate_close(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_closed = 1;
    pthread_mutex_unlock(&gate_mu);
}

HS_TEST_EXPORT void hs_test_gate_open(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_closed = 0;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
}

HS_TEST_EXPORT int hs_test_gate_waiting(void)
{
    pthread_mutex_lock(&gate_mu);
    int n = gate_waiting;
    pthread_mutex_unlock(&gate_mu);
    return n;
}

static void gate_pass(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_waiting++;
    while (gate_closed)
        pthread_cond_wait(&gate_cv, &gate_mu);
    gate_waiting--;
    pthread_mutex_unlock(&gate_mu);
}

HS_TEST_EXPORT const char *hs_test_last_options(void)
{
    return last_options;
}

static void log_call(const loader *L, const char *call, const char *model, int64_t version)
{
    if (L == NULL || L->call_log[0] == '\0')
        return;
    char line[1024];
    int n = snprintf(line, sizeof line, "%s %s %lld\n", call, model ? model : "-", (long long)version);
    int fd = open(L->call_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (n > 0)
        (void)!write(fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    close(fd);
}

/* ---- buffers: a 16-byte header keeps the real size, so a lying size cannot make release overrun ---------- */

static uint8_t *buffer_alloc(size_t n)
{
    uint64_t *p = malloc(16 + n);
    if (p == NULL)
        return NULL;
    p[0] = ALLOC_MAGIC;
    p[1] = n;
    count(C_LIVE, 1);
    return (uint8_t *)(p + 2);
}

static void buffer_free(hs_buffer *buf)
{
    if (buf == NULL || buf->data == NULL)
        return;
    uint64_t *p = (uint64_t *)buf->data - 2;
    if (p[0] == ALLOC_MAGIC) {
        explicit_bzero(buf->data, p[1]);
        p[0] = 0;
        free(p);
        count(C_LIVE, -1);
    }
    buf->data = NULL;
    buf->size = 0;
}

static int read_into(const char *path, hs_buffer *out, char *why)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        hs_err(why, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        hs_err(why, "%s: cannot seek", path);
        fclose(f);
        return -1;
    }
    long size = ftell(f);
    rewind(f);
    uint8_t *data = size >= 0 ? buffer_alloc((size_t)size) : NULL;
    if (data == NULL || fread(data, 1, (size_t)size, f) != (size_t)size) {
        hs_err(why, "%s: cannot read", path);
        hs_buffer tmp = {data, (size_t)size};
        buffer_free(&tmp);
        fclose(f);
        return -1;
    }
    fclose(f);
    out->data = data;
    out->size = (size_t)size;
    return 0;
}

/* ---- the ABI ------------------------------------------------------------------------------------------ */

int hs_loader_init(const char *loader_config_file, void **handle)
{
    count(C_INIT, 1);
    init_error[0] = '\0';
    loader *L = calloc(1, sizeof *L);
    if (L == NULL || handle == NULL) {
        free(L);
        hs_err(init_error, "out of memory");
        return HS_INTERNAL_ERROR;
    }
    if (loader_config_file != NULL) {
        char *text = NULL;
        size_t len = 0;
        char why[HS_ERR_CAP];
        if (hs_read_small(loader_config_file, 65536, &text, &len, why) != 0) {
            hs_err(init_error, "loader config: %s", why);
            free(L);
            return HS_INTERNAL_ERROR;
        }
        if (strstr(text, "FAIL_INIT") != NULL) {
            hs_err(init_error, "%s asks init to fail (FAIL_INIT)", loader_config_file);
            free(text);
            free(L);
            return HS_INTERNAL_ERROR;
        }
        const char *log = strstr(text, "CALL_LOG ");
        if (log != NULL)
            snprintf(L->call_log, sizeof L->call_log, "%.*s", (int)strcspn(log + 9, "\r\n"), log + 9);
        free(text);
    }
    *handle = L;
    log_call(L, "init", NULL, 0);
    return HS_OK;
}

static int load(loader *L, const char *name, const char *base, int64_t version, hs_kvs *opts, hs_buffer *model,
                hs_buffer *weights, char *why)
{
    char path[PATH_MAX];
    const char *mode = hs_kvs_get(opts, "mode");
    if (mode == NULL)
        mode = getenv("HS_TESTLOADER_MODE");
    if (mode == NULL)
        mode = "";
    const char *delay = hs_kvs_get(opts, "delay_ms");
    if (delay != NULL) {
        long ms = strtol(delay, NULL, 10);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    const char *hold = hs_kvs_get(opts, "hold_file");
    if (hold != NULL) {
        struct timespec tick = {0, 2000000L};
        while (access(hold, F_OK) == 0)
            nanosleep(&tick, NULL);
    }
    const char *enable = hs_kvs_get(opts, "enable_file");
    if (enable != NULL) {
        if (hs_version_file(path, base, version, "enable_file", enable, why) != 0)
            return HS_MODEL_LOAD_ERROR;
        (void)hs_watch_set(&L->watch, name, version, path);
        if (hs_is_disabled(path)) {
            hs_err(why, "disabled by enable_file %s", path);
            return HS_MODEL_BLACKLISTED;
        }
    } else {
        (void)hs_watch_set(&L->watch, name, version, NULL);
    }
    if (strcmp(mode, "load_error") == 0) {
        hs_err(why, "mode load_error");
        return HS_MODEL_LOAD_ERROR;
    }
    if (strcmp(mode, "internal_error") == 0) {
        hs_err(why, "mode internal_error");
        return HS_INTERNAL_ERROR;
    }
    if (strcmp(mode, "blacklisted") == 0) {
        hs_err(why, "mode blacklisted");
        return HS_MODEL_BLACKLISTED;
    }
    const char *model_file = hs_kvs_get(opts, "model_file");
    if (model_file == NULL) {
        hs_err(why, "custom_loader_options has no model_file");
        return HS_MODEL_LOAD_ERROR;
    }
    int type = hs_model_type(model_file);
    if (type < 0) {
        hs_err(why, "custom_loader_options.model_file \"%s\": unknown model type", model_file);
        return HS_MODEL_LOAD_ERROR;
    }
    const char *bin_file = hs_kvs_get(opts, "bin_file");
    if (type == HS_MODEL_TYPE_IR && bin_file == NULL) {
        hs_err(why, "custom_loader_options has no bin_file");
        return HS_MODEL_LOAD_ERROR;
    }
    if (hs_version_file(path, base, version, "model_file", model_file, why) != 0 || read_into(path, model, why) != 0)
        return HS_MODEL_LOAD_ERROR;
    if (type == HS_MODEL_TYPE_IR &&
        (hs_version_file(path, base, version, "bin_file", bin_file, why) != 0 || read_into(path, weights, why) != 0)) {
        buffer_free(model);
        return HS_MODEL_LOAD_ERROR;
    }
    if (strcmp(mode, "null_buffer") == 0) {
        buffer_free(model);
        return HS_MODEL_TYPE_IR;
    }
    if (strcmp(mode, "empty_buffer") == 0) {
        model->size = 0;
        return HS_MODEL_TYPE_IR;
    }
    if (strcmp(mode, "oversize") == 0) {
        model->size = (size_t)5 << 30;
        return HS_MODEL_TYPE_IR;
    }
    if (strcmp(mode, "bad_status") == 0)
        return 42;
    return type;
}

int hs_loader_load_model(void *handle, const char *model_name, const char *base_path, int64_t version,
                         const char *options_json, hs_buffer *model, hs_buffer *weights)
{
    count(C_LOAD, 1);
    gate_pass();
    loader *L = handle;
    if (L == NULL || model == NULL || weights == NULL || model_name == NULL || base_path == NULL ||
        options_json == NULL)
        return HS_INTERNAL_ERROR;
    log_call(L, "load_model", model_name, version);
    L->error[0] = '\0';
    snprintf(last_options, sizeof last_options, "%s", options_json);
    model->data = NULL;
    model->size = 0;
    weights->data = NULL;
    weights->size = 0;
    hs_kvs opts;
    char why[HS_ERR_CAP];
    int rc = HS_MODEL_LOAD_ERROR;
    if (hs_json_flat(options_json, "custom_loader_options", &opts, why) == 0) {
        rc = load(L, model_name, base_path, version, &opts, model, weights, why);
        hs_kvs_free(&opts);
    }
    if (rc != HS_MODEL_TYPE_IR && rc != HS_MODEL_TYPE_ONNX && rc != 42) {
        buffer_free(model);
        buffer_free(weights);
        hs_err(L->error, "%s", why);
    }
    return rc;
}

void hs_loader_release(void *handle, hs_buffer *buf)
{
    count(C_RELEASE, 1);
    (void)handle;
    buffer_free(buf);
}

int hs_loader_blacklist_status(void *handle, const char *model_name, int64_t version)
{
    count(C_BLACKLIST, 1);
    loader *L = handle;
    if (L == NULL || model_name == NULL)
        return HS_OK;
    log_call(L, "blacklist_status", model_name, version);
    return hs_watch_status(L->watch, model_name, version);
}

void hs_loader_unload_model(void *handle, const char *model_name, int64_t version)
{
    count(C_UNLOAD, 1);
    log_call(handle, "unload_model", model_name, version);
}

void hs_loader_retire_model(void *handle, const char *model_name)
{
    count(C_RETIRE, 1);
    loader *L = handle;
    log_call(L, "retire_model", model_name, 0);
    if (L != NULL && model_name != NULL)
        hs_watch_retire(&L->watch, model_name);
}

void hs_loader_deinit(void *handle)
{
    count(C_DEINIT, 1);
    loader *L = handle;
    log_call(L, "deinit", NULL, 0);
    if (L != NULL) {
        hs_watch_free(&L->watch);
        free(L);
    }
}

const char *hs_loader_last_error(void *handle)
{
    loader *L = handle;
    return L != NULL ? L->error : init_error;
}
