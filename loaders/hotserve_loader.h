/*
 * hotserve_loader.h — the custom loader ABI of hotserve (ABI version 1).
 *
 * A custom loader is a shared library that hands hotserve a model's bytes from memory, for example after
 * decrypting them. It has the semantics of OpenVINO Model Server's CustomLoaderInterface, but as a plain C ABI,
 * so a loader can be written in C, C++ (extern "C"), Rust (#[no_mangle] extern "C") or Zig (export fn).
 * This header is the reference for loader authors; the sample is loaders/aesgcm/aesgcm.c.
 *
 * ---------------------------------------------------------------------------------------------------------
 * Configuration (models.json, OVMS format)
 *
 *   "custom_loader_config_list": [
 *     {"config": {"loader_name": "aes", "library_path": "build/libaesgcm.so",
 *                 "loader_config_file": "keys/aes.json"}}          <- optional; passed to hs_loader_init
 *   ],
 *   "model_config_list": [
 *     {"config": {"name": "m", "base_path": "models/m",
 *                 "custom_loader_options": {"loader_name": "aes", "model_file": "model.xml.enc",
 *                                           "bin_file": "model.bin.enc"}}}
 *   ]
 *
 * The version folders (base_path/1, base_path/2, ...) must exist on disk: they decide which versions exist.
 * What is inside them is the loader's business.
 *
 * ---------------------------------------------------------------------------------------------------------
 * Symbols a loader must export (all of them; a missing one is reported by name and the loader is not used)
 *
 *   hs_loader_abi_version        const uint32_t == HS_LOADER_ABI_VERSION, checked before any call
 *   hs_loader_init               once per loader entry in the config
 *   hs_loader_load_model         once per load of a model version (first load, reload, re-shape)
 *   hs_loader_release            once per non-NULL buffer that hs_loader_load_model filled
 *   hs_loader_blacklist_status   on every reconcile, for each version the config asks for
 *   hs_loader_unload_model       once per successful hs_loader_load_model, when nothing compiled from it is left
 *   hs_loader_retire_model       when a model leaves the config (or stops using this loader)
 *   hs_loader_deinit             once the entry left the config or changed and its last load is unloaded; at shutdown
 *   hs_loader_last_error         the reason of the last failure
 *
 * Lifecycle of one handle (what hotserve does, in order):
 *   1. dlopen(library_path, RTLD_NOW | RTLD_LOCAL); check the symbols and hs_loader_abi_version.
 *      The library is never dlclose'd (as in OVMS): a handle may be re-created from the same library.
 *   2. hs_loader_init(loader_config_file or NULL, &handle). If the loader entry changes in the config, a new
 *      handle is initialised first; the models reload through it while their old versions keep serving. The
 *      old handle gets no new loads and is deinitialised once every version loaded through it has been freed
 *      and unloaded through it (step 5) -- never while the server may still read one of its buffers.
 *   3. For each version to (re)load: hs_loader_load_model(...) -> the server reads the model from the buffers
 *      (OpenVINO copies what it keeps) -> hs_loader_release(handle, &model) and hs_loader_release(handle,
 *      &weights) right away, before or just after compiling. A buffer is never held while a model serves.
 *      Changing custom_loader_options in the config reloads the model's versions through the loader.
 *   4. On every reconcile (config change and every poll of the file system), for each version the version
 *      policy wants: hs_loader_blacklist_status(handle, name, version). A blacklisted AVAILABLE version is
 *      retired (END); when the status returns to HS_OK the version is loaded again.
 *   5. hs_loader_unload_model(handle, name, version) exactly once for each successful hs_loader_load_model,
 *      when nothing compiled from that load is left: the version was freed (retired, blacklisted, or replaced
 *      by a reload or a re-shape), or the compile was discarded (superseded, shutdown) or failed. Because a
 *      reload serves before the old compile retires, an unload of a version may arrive after the load that
 *      replaced it: count loads and unloads per version rather than treating one unload as "version gone".
 *      Unloads are sent in the order the compiles are freed, from one server thread.
 *      hs_loader_retire_model(handle, name) when the whole model is gone from the config. Both are
 *      notifications: the loader may drop per-model state; they cannot fail.
 *   6. hs_loader_deinit(handle) once; no call uses the handle afterwards.
 *
 * ---------------------------------------------------------------------------------------------------------
 * Status codes and what the server makes of them
 *
 *   hs_loader_load_model returns the model type on success:
 *     HS_MODEL_TYPE_IR     model = the IR's XML text (need not end in NUL), weights = the .bin content
 *     HS_MODEL_TYPE_ONNX   model = the .onnx file content, self-contained (OpenVINO cannot read ONNX external
 *                          data from memory); weights unused (leave it {NULL, 0})
 *   and on failure (the version stays LOADING with this error, as in OVMS):
 *     HS_MODEL_LOAD_ERROR  -> FILE_INVALID   "File not found or cannot open"   (missing / unreadable / corrupt /
 *                                                                              fails authentication)
 *     HS_MODEL_BLACKLISTED -> INTERNAL_ERROR "Internal server error"           (the version is disabled)
 *     HS_INTERNAL_ERROR    -> INTERNAL_ERROR "Internal server error"           (anything else)
 *   Any other return value, or a success with a NULL / empty model buffer or a buffer above the server's size
 *   limit (4 GiB by default), is treated as HS_INTERNAL_ERROR; the buffers are still released.
 *   The server appends hs_loader_last_error(handle) to the version's error message, after the loader's name,
 *   library, model and version: the message need only say what failed and where (file, option).
 *
 *   hs_loader_init returns HS_OK or any other value for failure (the loader is then not used and the models
 *   that name it fail with "custom loader not found"; unlike OVMS, the return value is honoured).
 *   hs_loader_blacklist_status returns HS_MODEL_BLACKLISTED or HS_OK; anything else counts as HS_OK.
 *
 * ---------------------------------------------------------------------------------------------------------
 * Memory
 *
 *   hs_buffer is owned by the loader. hs_loader_load_model fills model and weights (both arrive as {NULL, 0});
 *   the server only reads them and hands each non-NULL buffer back through hs_loader_release, exactly once,
 *   with the same data and size, whatever the return status was. The loader wipes the memory (the plaintext)
 *   and frees it there, then sets {NULL, 0}. On failure a loader should leave both buffers {NULL, 0}.
 *   hs_loader_deinit may free buffers that were never released (the server releases them all before deinit).
 *
 * Threads
 *
 *   The server serialises every call into one handle with a lock: calls for one handle never overlap, but they
 *   may come from different threads (a worker pool), so keep per-call state in the handle, not in
 *   thread-locals. Two loader entries that name the same library get two handles that may be called
 *   concurrently: state shared between handles (globals) must be protected by the loader.
 *   hs_loader_last_error(NULL) is the exception: it returns the reason of the last failed hs_loader_init on the
 *   calling thread (there is no handle yet), so keep that one message thread-local.
 *
 * Secrets
 *
 *   Loader messages (hs_loader_last_error) are shown in logs and in model status: they must never contain key
 *   material or model content. Name files, models, versions and fields instead.
 *
 * ---------------------------------------------------------------------------------------------------------
 * Writing a loader in another language: export exactly these names with the C calling convention, e.g. Rust
 *   #[no_mangle] pub static hs_loader_abi_version: u32 = 1;
 *   #[no_mangle] pub extern "C" fn hs_loader_init(cfg: *const c_char, handle: *mut *mut c_void) -> c_int
 *   #[repr(C)] pub struct HsBuffer { data: *mut u8, size: usize }
 */
#ifndef HOTSERVE_LOADER_H
#define HOTSERVE_LOADER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HS_LOADER_ABI_VERSION 1u

#define HS_OK 0
#define HS_MODEL_TYPE_IR 1
#define HS_MODEL_TYPE_ONNX 2
#define HS_MODEL_LOAD_ERROR 3
#define HS_MODEL_BLACKLISTED 4
#define HS_INTERNAL_ERROR 5

#if defined(__GNUC__) || defined(__clang__)
#define HS_LOADER_EXPORT __attribute__((visibility("default")))
#else
#define HS_LOADER_EXPORT
#endif

/* Memory owned by the loader: the server reads it and gives it back with hs_loader_release. */
typedef struct hs_buffer {
    uint8_t *data;
    size_t size;
} hs_buffer;

/* Must equal HS_LOADER_ABI_VERSION; define it as `const uint32_t hs_loader_abi_version = HS_LOADER_ABI_VERSION;`. */
HS_LOADER_EXPORT extern const uint32_t hs_loader_abi_version;

/* loader_config_file: the entry's loader_config_file resolved against the config's folder, or NULL when
 * absent. On success stores the loader's state in *handle (may be NULL for a stateless loader) and returns
 * HS_OK; on failure returns another code and makes hs_loader_last_error(NULL) explain why. */
HS_LOADER_EXPORT int hs_loader_init(const char *loader_config_file, void **handle);

/* base_path: the model's base_path as written in the config, resolved against the config's folder (not the
 * version folder); version: the version number (its folder is base_path/<version>). options_json: compact
 * JSON of the model's custom_loader_options object (including "loader_name"), keys in config order.
 * Returns HS_MODEL_TYPE_IR / HS_MODEL_TYPE_ONNX with *model (and *weights for IR) filled, or an error code. */
HS_LOADER_EXPORT int hs_loader_load_model(void *handle, const char *model_name, const char *base_path,
                                          int64_t version, const char *options_json, hs_buffer *model,
                                          hs_buffer *weights);

/* Wipe and free a buffer filled by hs_loader_load_model; set it to {NULL, 0}. Accepts {NULL, 0}. */
HS_LOADER_EXPORT void hs_loader_release(void *handle, hs_buffer *buf);

/* HS_MODEL_BLACKLISTED when this version must not be served now, else HS_OK. Cheap: called on every poll. */
HS_LOADER_EXPORT int hs_loader_blacklist_status(void *handle, const char *model_name, int64_t version);

/* Notification: nothing compiled from one earlier successful load of this version is left (once per load). */
HS_LOADER_EXPORT void hs_loader_unload_model(void *handle, const char *model_name, int64_t version);

/* Notification: the model left the config (all its versions are being unloaded). */
HS_LOADER_EXPORT void hs_loader_retire_model(void *handle, const char *model_name);

/* Free the handle: wipe keys and any buffer still held. The handle is not used again. */
HS_LOADER_EXPORT void hs_loader_deinit(void *handle);

/* The reason of the last failure of a call into `handle` (NULL: of the last hs_loader_init on this thread).
 * Never NULL ("" when there is none); valid until the next call into the same handle. No secrets in it. */
HS_LOADER_EXPORT const char *hs_loader_last_error(void *handle);

#ifdef __cplusplus
}
#endif

#endif /* HOTSERVE_LOADER_H */
