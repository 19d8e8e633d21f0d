/* A loader that forgot two symbols (hs_loader_blacklist_status and hs_loader_retire_model). */
#include "../hotserve_loader.h"

const uint32_t hs_loader_abi_version = HS_LOADER_ABI_VERSION;

int hs_loader_init(const char *loader_config_file, void **handle)
{
    (void)loader_config_file;
    *handle = 0;
    return HS_OK;
}

int hs_loader_load_model(void *handle, const char *model_name, const char *base_path, int64_t version,
                         const char *options_json, hs_buffer *model, hs_buffer *weights)
{
    (void)handle, (void)model_name, (void)base_path, (void)version, (void)options_json, (void)model, (void)weights;
    return HS_INTERNAL_ERROR;
}

void hs_loader_release(void *handle, hs_buffer *buf) { (void)handle, (void)buf; }
void hs_loader_unload_model(void *handle, const char *model_name, int64_t version)
{
    (void)handle, (void)model_name, (void)version;
}
void hs_loader_deinit(void *handle) { (void)handle; }
const char *hs_loader_last_error(void *handle)
{
    (void)handle;
    return "";
}
