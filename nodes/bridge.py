"""The one place that imports ComfyUI (comfy*, folder_paths, latent_preview): node API, model folders, sigmas,
latent format, noise, progress/previews/interrupt, VRAM, and the registry of live worker groups.

It also puts the pack's folder on ``sys.path`` and imports ``dualparal_core`` as a top-level package, so that the
dataclasses pickled here (PoolSpec, Job) unpickle in the workers (``python -m dualparal_core.worker``, started with
the same folder on PYTHONPATH) under the same module name. ComfyUI itself imports this pack under a path-like
module name (research §1.1, §5.6), which no child process could import.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PACK_DIR not in sys.path:
    # Appended, not prepended: ComfyUI's own top-level modules (nodes, utils, ...) must keep winning.
    sys.path.append(PACK_DIR)

import comfy.latent_formats  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import latent_preview  # noqa: E402
import torch  # noqa: E402

try:
    from comfy_api.latest import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)
except ImportError as _e:  # ComfyUI before 0.3.48 has no V3 node API
    raise ImportError("DualParal needs ComfyUI 0.3.48 or newer (the V3 node API, comfy_api.latest); "
                      "update ComfyUI.") from _e

import dualparal_core  # noqa: E402
from dualparal_core.config import Timeouts  # noqa: E402

from .graph_watch import GraphWatch  # noqa: E402
from .registry import PoolRegistry  # noqa: E402
from .types import LORAS_TYPE, MODEL_TYPE, DualParalModel  # noqa: E402

logger = logging.getLogger("DualParal")
if os.path.dirname(os.path.dirname(os.path.abspath(dualparal_core.__file__))) != PACK_DIR:
    logger.warning("dualparal_core was imported from %s, not from this pack (%s): two copies of the DualParal "
                   "pack are installed; remove one.", dualparal_core.__file__, PACK_DIR)

InterruptProcessingException = mm.InterruptProcessingException
#: The pack's socket types (names are stable: shared workflows refer to them).
ModelSocket = io.Custom(MODEL_TYPE)
LorasSocket = io.Custom(LORAS_TYPE)
SCHEDULERS: list[str] = list(comfy.samplers.KSampler.SCHEDULERS)


# ---------------------------------------------------------------------------------------------- model folders
def diffusion_model_names() -> list[str]:
    return folder_paths.get_filename_list("diffusion_models")


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def full_path(kind: str, name: str) -> str:
    return folder_paths.get_full_path_or_raise(kind, name)


def gpu_count() -> int:
    """GPUs this process sees (CUDA_VISIBLE_DEVICES applies)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------------------------------------- sampling maths
class _SamplingModel:
    """Just enough of a ComfyUI ModelPatcher for ``comfy.samplers.KSampler`` (sigmas) and
    ``comfy.sample.fix_empty_latent_channels``: the Wan model's flow sampling with ``shift`` and its latent format.

    The sampling object is built as ``ModelSamplingSD3`` builds it (``ModelSamplingDiscreteFlow`` + ``CONST``,
    ``set_parameters(shift, multiplier=1000)``); without that node a Wan model gets the same with shift 8.0.
    """

    def __init__(self, shift: float):
        class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass

        ms = ModelSamplingAdvanced()
        ms.set_parameters(shift=shift, multiplier=1000)
        self._objects = {"model_sampling": ms, "latent_format": latent_format()}

    def get_model_object(self, name: str):
        return self._objects[name]


def latent_format():
    """ComfyUI's Wan2.1 latent format (process_in/process_out, preview factors)."""
    return comfy.latent_formats.Wan21()


def concat_resizers():
    """ComfyUI's resize helpers as ``WAN21.concat_cond`` calls them: (upscale(x, width, height) bilinear with a
    center crop, resize_to_batch_size)."""
    return (lambda x, w, h: comfy.utils.common_upscale(x, w, h, "bilinear", "center"),
            comfy.utils.resize_to_batch_size)


def compute_sigmas(steps: int, sampler_name: str, scheduler: str, shift: float, denoise: float) -> torch.Tensor:
    """The sigma table KSampler would use for a Wan model with this shift: ComfyUI's own scheduler code, its
    discard-penultimate rule (uni_pc, ...) and its denoise < 1 truncation (``KSampler.set_steps``)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not one of ComfyUI's schedulers {SCHEDULERS}.")
    ks = comfy.samplers.KSampler(_SamplingModel(shift), steps=steps, device="cpu", sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise)
    return ks.sigmas.detach().to("cpu", torch.float32)


def fix_latent(samples: torch.Tensor, shift: float = 8.0) -> torch.Tensor:
    """``comfy.sample.fix_empty_latent_channels`` as KSampler applies it (4-D -> 5-D, empty channel repeat)."""
    return comfy.sample.fix_empty_latent_channels(_SamplingModel(shift), samples)


def prepare_noise(samples: torch.Tensor, seed: int, batch_index) -> torch.Tensor:
    """KSampler's noise for a latent with a batch_index (``comfy.sample.prepare_noise``)."""
    return comfy.sample.prepare_noise(samples, seed, batch_index).to(torch.float32)


# ---------------------------------------------------------------------------------------------- worker groups
_original_unload_all_models = getattr(mm.unload_all_models, "_dualparal_original", mm.unload_all_models)


def _free_comfy_vram(spec) -> None:
    """Before workers start on GPUs: move ComfyUI's own models off its GPU and return cached blocks."""
    if any(d.startswith("cuda") for d in spec.devices):
        _original_unload_all_models()
        mm.soft_empty_cache()


def _start_pool(spec, **kw):
    from dualparal_core.attach import AttachSpec
    from dualparal_core.pool import WorkerPool

    timeouts = Timeouts.from_env(os.environ)  # DUALPARAL_STARTUP_TIMEOUT, DUALPARAL_STEP_TIMEOUT, ...
    if isinstance(spec, AttachSpec):  # devices=tcp://HOST:PORT: close() detaches, the group keeps running
        return WorkerPool.attach(spec, timeouts, **kw)
    return WorkerPool.start(spec, timeouts, **kw)


def _check_spec(spec) -> None:
    """Every check that can run here (fields, files' headers, GPUs, timeouts), before the registry stops a pool."""
    from dualparal_core.attach import AttachSpec
    from dualparal_core.pool import child_env
    from dualparal_core.runtime import check_spec

    Timeouts.from_env(os.environ)
    if isinstance(spec, AttachSpec):  # the group finds the files on its own hosts
        if spec.model is not None:
            spec.model.validate()
        return
    check_spec(spec, child_env(None))


REGISTRY = PoolRegistry(_start_pool, _free_comfy_vram, _check_spec)


def _unload_all_models_and_pools(*args, **kwargs):
    # ComfyUI calls this for "Unload models" / POST /free, after an OOM, and per prompt with
    # --disable-smart-memory: in every case it means "give the memory back", so our workers go too.
    REGISTRY.close_all("ComfyUI unloaded all models")
    return _original_unload_all_models(*args, **kwargs)


_unload_all_models_and_pools._dualparal_original = _original_unload_all_models
mm.unload_all_models = _unload_all_models_and_pools
atexit.register(REGISTRY.close_all, "ComfyUI is exiting")


def _watch_graphs() -> GraphWatch | None:
    """Release the pools when the last graph queued has no DualParal Loader (graph_watch.py has the rule): an
    on-prompt handler of ComfyUI's server, and its prompt queue's running and pending graphs. None without a server
    (the pack imported by a script or a test)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return None
    queue = server.prompt_queue

    def queued() -> list:
        running, pending = queue.get_current_queue_volatile()
        return [item[2] for item in (*running, *pending)]  # (number, prompt_id, graph, extra_data, outputs)

    watch = GraphWatch(queued, REGISTRY.close_all)
    server.add_on_prompt_handler(watch.on_prompt)
    return watch


GRAPH_WATCH = _watch_graphs()


def supports_attach() -> bool:
    from dualparal_core.pool import WorkerPool

    return hasattr(WorkerPool, "attach")


def _map_errors(handle: DualParalModel, fn, *args, **kw):
    """Run ``fn`` mapping the pool's exceptions to ComfyUI's: cancel -> InterruptProcessingException; a failed
    worker group is dropped from the registry so the next prompt starts a fresh one."""
    from dualparal_core.attach import AttachError
    from dualparal_core.pool import PoolCancelled, WorkerError

    try:
        return fn(*args, **kw)
    except AttachError as err:  # devices=tcp://...: nothing listens there, another key, in use
        raise AttachError(f"devices={handle.spec.devices[0]!r}: {err}") from None
    except PoolCancelled:
        mm.throw_exception_if_processing_interrupted()  # raises and clears the flag
        raise InterruptProcessingException() from None
    except WorkerError as err:
        REGISTRY.release(handle.key, "a worker failed")
        if err.exc_type == "OutOfMemoryError":  # e.g. loading the weights: ComfyUI's OOM path (tips, unload)
            raise torch.OutOfMemoryError(str(err)) from err
        raise


def acquire(handle: DualParalModel):
    """The live worker group of a model handle, started (ComfyUI's VRAM freed first) if there is none."""
    if GRAPH_WATCH is not None:
        GRAPH_WATCH.barrier()  # a release decided before this prompt was taken ends first
    return _map_errors(handle, REGISTRY.acquire, handle.key, handle.spec,
                       on_status=lambda msg: logger.info("%s", msg), should_abort=mm.processing_interrupted)


def release(handle: DualParalModel, reason: str) -> None:
    REGISTRY.release(handle.key, reason)


def run_job(handle: DualParalModel, pool, job, node_id: str | None, on_done=None) -> torch.Tensor:
    """``pool.generate`` with ComfyUI's progress bar (block-steps), latent previews and Cancel.

    Only this (the node's) thread touches ComfyUI's interrupt flag: the progress hook would raise
    InterruptProcessingException inside the pool's loop, so progress is skipped once the flag is set and
    ``should_cancel`` lets the pool stop its workers cleanly; the exception is raised here afterwards.
    ``on_done(done)`` (optional) is called after every block-step too (the prompt timeline's status line).
    """
    previewer = latent_preview.get_previewer(torch.device("cpu"), latent_format()) if job.preview else None
    pbar = comfy.utils.ProgressBar(job.num_block_steps, node_id=node_id)

    def on_progress(done: int, total: int, x0) -> None:
        if mm.processing_interrupted():
            return
        if on_done is not None:
            on_done(done)
        preview = None
        if previewer is not None and x0 is not None:
            try:
                preview = previewer.decode_latent_to_preview_image("JPEG", x0)
            except Exception:  # a preview must never fail the job
                logger.debug("DualParal preview failed", exc_info=True)
        try:
            pbar.update_absolute(done, total, preview)
        except InterruptProcessingException:
            mm.interrupt_current_processing(True)  # the hook cleared the flag: set it again for should_cancel

    return _map_errors(handle, pool.generate, job, on_progress=on_progress, should_cancel=mm.processing_interrupted)


def previews_enabled() -> bool:
    return latent_preview.get_previewer(torch.device("cpu"), latent_format()) is not None


# ---------------------------------------------------------------------------------------------- Block Decode
def live_pool(handle: DualParalModel):
    """The running worker group of a model handle, or None (never starts one: decoding is no reason to load)."""
    return REGISTRY.get(handle.key)


def pool_decode(handle: DualParalModel, fn, *args, **kw):
    """A decode on the handle's pool with the pool's errors mapped to ComfyUI's (cancel -> interrupt)."""
    return _map_errors(handle, fn, *args, **kw)


def decode_device(vae) -> torch.device:
    """Where core VAE Decode would decode: the VAE's own device, else ComfyUI's torch device."""
    dev = getattr(vae, "device", None)
    return torch.device(dev) if dev is not None else mm.get_torch_device()


def free_vram_for_decode(vae, shape, dtype, device: torch.device) -> None:
    """Make room on ComfyUI's GPU as VAE Decode does (ComfyUI's estimate is for a whole decode: an upper bound)."""
    if device.type != "cuda":
        return
    try:
        need = vae.memory_used_decode(shape, dtype)
    except Exception:  # an estimate only; a VAE object without it decodes all the same
        need = 2 * 1024**3
    mm.free_memory(need, device)


def interrupted() -> bool:
    return mm.processing_interrupted()


def progress_bar(total: int, node_id: str | None):
    """``on_progress(done, total)`` on a ComfyUI progress bar; raises InterruptProcessingException when cancelled."""
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)
    return lambda done, total: pbar.update_absolute(done, total)


def video_output_path(prefix: str, width: int, height: int, ext: str) -> tuple[str, str, str]:
    """(full path, file name, subfolder) of a new file in ComfyUI's output folder, numbered as Save Video does."""
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    os.makedirs(folder, exist_ok=True)
    file = f"{name}_{counter:05}_{ext}"
    return os.path.join(folder, file), file, subfolder


def temp_directory() -> str:
    return folder_paths.get_temp_directory()


def metadata_enabled() -> bool:
    from comfy.cli_args import args

    return not args.disable_metadata


def video_ui(file: str, subfolder: str):
    """The node's UI output for a saved video, as core Save Video reports it."""
    from comfy_api.latest import ui

    return ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)])
