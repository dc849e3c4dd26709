"""The AUTOMATIC1111-compatible API, translated to SDCN jobs and back (pure: no I/O).

An A1111 client sends the webui's whole payload. Each field is used (translated into the SDCN
job), ignored (it changes nothing the network draws: saving, hires settings while hires fix is
off, inpainting settings without a mask), or accepted only at the value that changes nothing
(``enable_hr: false``, ``styles: []``, ``eta`` at one of the webui's defaults). Any other value,
and any field the webui does not know, is refused with ``JobError("bad_request",
"<field>: ...")``: a parameter silently dropped would give the wrong picture. ``null`` means
"the default", as it does to the webui.

Translation:

- model: ``override_settings.sd_model_checkpoint`` (a model name, or a webui title such as
  ``"v1-5-pruned-emaonly.safetensors [6ce0161689]"``, or a short hash), else the gateway's
  default model (``POST /sdapi/v1/options``); names and titles are matched against the adverts.
- LoRAs: ``<lora:name:weight>`` tags (``<lyco:…>`` too) are taken out of the prompt sent to
  the provider, which applies them from the job's ``loras``; ``info.prompt`` keeps them, as
  the webui's does. ``disable_extra_networks: true`` drops them without applying them.
  ``<hypernet:…>`` is refused; other ``<word:…>`` text stays in the prompt.
- sampler: ``sampler_name``, else ``sampler_index``, else "Euler" (the webui's API default);
  a ``scheduler`` ("karras" or "Karras") is appended as its label: "DPM++ 2M Karras".
- images: ``batch_size`` * ``n_iter`` images (at most MAX_IMAGES), image i with seed
  ``seed + i``, sent as jobs of up to MAX_BATCH_SIZE images each (run in parallel).
- defaults are the webui API's: 50 steps, cfg 7, 512x512, denoising strength 0.75.
- ``force_task_id`` (A1111 1.6+) names the job, for ``GET /sdapi/v1/progress?id_task=``.

`progress` is ``GET /sdapi/v1/progress``: the webui's answer, for the jobs of one client.
"""

from __future__ import annotations

import base64
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.catalog import find_model, model_title
from gateway.jobservice import JobState
from gateway.sdcn import parse_request as parse_sdcn_request
from sdcn_p2p._version import AGENT_VERSION
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import MAX_BATCH_SIZE, MAX_LORAS, MAX_SEED, SCHEDULERS, JobRequest, split_sampler
from sdcn_p2p.records import Advert, ModelInfo

__all__ = [
    "DEFAULT_SAMPLER",
    "MAX_IMAGES",
    "MAX_TASK_ID_CHARS",
    "A1111Request",
    "options",
    "parse_options",
    "parse_request",
    "progress",
]

#: Most images one request may ask for (batch_size * n_iter).
MAX_IMAGES = 16
#: Longest ``force_task_id`` accepted.
MAX_TASK_ID_CHARS = 128
#: The sampler of a request that names none (the webui API's default ``sampler_index``).
DEFAULT_SAMPLER = "Euler"
_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "denoising_strength": 0.75,
}


# --- the fields of a request -------------------------------------------------------------------

#: Fields read by the translation (txt2img and img2img alike; img2img ones are checked by kind).
_USED = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "sampler_name",
        "sampler_index",
        "scheduler",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "batch_size",
        "n_iter",
        "override_settings",
        "denoising_strength",
        "init_images",
        "send_images",
        "include_init_images",
        "disable_extra_networks",
        "force_task_id",
    }
)

#: Fields that change nothing the network draws, whatever their value.
_IGNORED = frozenset(
    {
        # saving, bookkeeping
        "save_images",
        "do_not_save_samples",
        "do_not_save_grid",
        "override_settings_restore_afterwards",
        "comments",
        # the variation seed, while subseed_strength is 0
        "subseed",
        # hires fix, while enable_hr is false
        "firstphase_width",
        "firstphase_height",
        "firstpass_image",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
        "hr_checkpoint_name",
        "hr_sampler_name",
        "hr_scheduler",
        "hr_prompt",
        "hr_negative_prompt",
        # the refiner, while refiner_checkpoint is unset
        "refiner_switch_at",
        # a selectable script's arguments, while script_name is unset
        "script_args",
        # inpainting, while there is no mask
        "mask_blur",
        "mask_blur_x",
        "mask_blur_y",
        "mask_round",
        "inpainting_fill",
        "inpaint_full_res",
        "inpaint_full_res_padding",
        "inpainting_mask_invert",
        # instruct-pix2pix models only, which the network does not offer
        "image_cfg_scale",
    }
)


def _is(*values: object) -> Callable[[Any], bool]:
    """A check that passes the given values only (numbers compare by value, not type)."""

    def check(value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in values) or (
            _is_number(value) and any(_is_number(v) and value == v for v in values)
        )

    return check


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _empty(value: Any) -> bool:
    return value in ("", [], {})


#: Fields accepted only at the value that changes nothing (null is always accepted), with why
#: another value is refused.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enable_hr": (_is(False), "hires fix is not available on the network; send false"),
    "restore_faces": (_is(False), "face restoration is not available on the network"),
    "tiling": (_is(False), "tiling is not available on the network"),
    "styles": (_empty, "prompt styles are not available on the network; send []"),
    "subseed_strength": (_is(0), "variation seeds are not available on the network; send 0"),
    "seed_resize_from_h": (
        lambda v: _is_number(v) and v <= 0,
        "seed resizing is not available on the network; send -1",
    ),
    "seed_resize_from_w": (
        lambda v: _is_number(v) and v <= 0,
        "seed resizing is not available on the network; send -1",
    ),
    # The providers run their samplers' defaults: eta is 1 for ancestral samplers and 0 for
    # DDIM-like ones in the webui, and clients send either.
    "eta": (_is(0, 1), "providers run the sampler's default eta; send null, 0 or 1"),
    "s_min_uncond": (_is(0), "providers run the default; send null or 0"),
    "s_churn": (_is(0), "providers run the default; send null or 0"),
    "s_tmin": (_is(0), "providers run the default; send null or 0"),
    "s_tmax": (_is(0), "providers run the default; send null or 0"),
    "s_noise": (_is(1), "providers run the default; send null or 1"),
    "initial_noise_multiplier": (_is(1), "providers run the default; send null or 1"),
    "refiner_checkpoint": (
        _is("", "None", "none"),
        "a refiner is not available on the network",
    ),
    "script_name": (_empty, "scripts are not available on the network (see /sdapi/v1/scripts)"),
    "alwayson_scripts": (
        _empty,
        "scripts are not available on the network (see /sdapi/v1/scripts)",
    ),
    "infotext": (_empty, "infotext parameters are not supported; send the fields instead"),
    "resize_mode": (_is(0), "only resize mode 0 (just resize) is available"),
    "mask": (_empty, "inpainting is not available on the network"),
    "latent_mask": (_empty, "inpainting is not available on the network"),
}
_IMG2IMG_ONLY = frozenset({"init_images", "mask", "latent_mask"})
_KNOWN = _USED | _IGNORED | frozenset(_NEUTRAL)

#: ``override_settings`` (and ``POST /options``) keys that change nothing the network draws.
_HARMLESS_SETTINGS = frozenset(
    {
        "samples_save",
        "samples_format",
        "samples_filename_pattern",
        "save_images_add_number",
        "save_to_dirs",
        "directories_filename_pattern",
        "grid_save",
        "grid_format",
        "grid_save_to_dirs",
        "outdir_samples",
        "outdir_txt2img_samples",
        "outdir_img2img_samples",
        "outdir_grids",
        "outdir_txt2img_grids",
        "outdir_img2img_grids",
        "outdir_save",
        "enable_pnginfo",
        "save_txt",
        "jpeg_quality",
        "webp_lossless",
        "export_for_4chan",
        "add_model_hash_to_info",
        "add_model_name_to_info",
        "add_version_to_infotext",
        "add_user_name_to_info",
        "live_previews_enable",
        "show_progress_every_n_steps",
        "sd_checkpoint_hash",
    }
)
#: Settings accepted at the webui's default only, which is what providers run.
_DEFAULT_SETTINGS: dict[str, tuple[object, ...]] = {
    "CLIP_stop_at_last_layers": (1,),
    "eta_noise_seed_delta": (0,),
    "sd_vae": ("Automatic",),
    "randn_source": ("GPU",),
    "token_merging_ratio": (0,),
    "img2img_fix_steps": (False,),
}
_CHECKPOINT = "sd_model_checkpoint"

# The webui's extra network syntax: <lora:name:weight>, <hypernet:name:weight>.
_EXTRA_NETWORK = re.compile(r"<(?P<kind>\w+):(?P<args>[^>]+)>")
_bad = JobError.bad_request


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class A1111Request:
    """A checked A1111 request: the SDCN job it asks for, and how to split and report it."""

    kind: str
    #: The SDCN API body of the job (before splitting into batches): `job` validates it.
    sdcn: dict[str, Any] = field(repr=False)
    images: int  # batch_size * n_iter
    batch_size: int
    n_iter: int
    seed: int  # concrete: image i has seed + i
    subseed: int
    prompt: str  # as received, with its LoRA tags
    negative_prompt: str
    model: ModelInfo | None  # the advertised model, None when no advert names it
    send_images: bool
    #: The request as received, minus the init images unless ``include_init_images``.
    parameters: dict[str, Any] = field(repr=False)
    #: The client's ``force_task_id``, if it sent one.
    task_id: str | None = None

    def job(self) -> JobRequest:
        """Validate the SDCN job, naming fields as the A1111 client knows them.

        Decodes the init image (CPU work: run it in a worker thread for img2img). Raises
        JobError("bad_request", ...).
        """
        try:
            return parse_sdcn_request(self.kind, self.sdcn)
        except JobError as exc:
            raise JobError(exc.code, _a1111_names(exc.message)) from None

    def split(self, job: JobRequest) -> list[JobRequest]:
        """The jobs to run: `images` images in order, MAX_BATCH_SIZE at most per job."""
        jobs = []
        for first in range(0, self.images, MAX_BATCH_SIZE):
            count = min(MAX_BATCH_SIZE, self.images - first)
            jobs.append(replace(job, seed=self.seed + first, batch_size=count))
        return jobs

    def response(
        self, results: Sequence[tuple[Sequence[bytes], Mapping[str, Any]]], now: float
    ) -> dict[str, Any]:
        """The webui's response to this request: ``images`` (raw base64 PNG), ``parameters``
        and ``info``, a JSON string.

        `results` are the (PNG images, provider info) of the jobs of `split`, in order; `now`
        is the wall time (seconds) for ``job_timestamp``. Call it once `job` has validated
        the request.
        """
        images = [png for pngs, _ in results for png in pngs] if self.send_images else []
        return {
            "images": [base64.b64encode(png).decode("ascii") for png in images],
            "parameters": self.parameters,
            "info": json.dumps(self._info(results, now), ensure_ascii=False),
        }

    def _info(
        self, results: Sequence[tuple[Sequence[bytes], Mapping[str, Any]]], now: float
    ) -> dict[str, Any]:
        sdcn = self.sdcn
        # Since 1.9 the webui reports "DPM++ 2M" and the scheduler apart.
        sampler, scheduler = split_sampler(sdcn["sampler_name"])
        label = next((k for k, v in SCHEDULERS.items() if v == scheduler), None)
        first = results[0][1] if results else {}
        model_name = first.get("model") or (self.model.name if self.model else sdcn["model"])
        model_hash = self.model.hash or None if self.model else None
        denoising = float(sdcn["denoising_strength"]) if self.kind == "img2img" else None
        seeds = [self.seed + i for i in range(self.images)]
        settings = {
            "Steps": sdcn["steps"],
            "Sampler": sampler,
            "Schedule type": label,
            "CFG scale": float(sdcn["cfg_scale"]),
            "Seed": None,  # per image
            "Size": f"{sdcn['width']}x{sdcn['height']}",
            "Model hash": model_hash,
            "Model": model_name,
            "Denoising strength": denoising,
            "Version": AGENT_VERSION,
        }
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        infotexts = [
            f"{self.prompt}{negative}\n"
            + ", ".join(f"{k}: {v}" for k, v in {**settings, "Seed": seed}.items() if v is not None)
            for seed in seeds
        ]
        jobs = [
            {
                "provider": info.get("provider"),
                "attempts": info.get("attempts"),
                "queue_ms": info.get("queue_ms"),
                "run_ms": info.get("run_ms"),
                "seed": info.get("seed"),
                "images": len(pngs),
            }
            for pngs, info in results
        ]
        # The first job's figures; "jobs" has each job's, when there were several.
        summary = {k: first.get(k) for k in ("provider", "attempts", "queue_ms", "run_ms")}
        return {
            "prompt": self.prompt,
            "all_prompts": [self.prompt] * self.images,
            "negative_prompt": self.negative_prompt,
            "all_negative_prompts": [self.negative_prompt] * self.images,
            "seed": self.seed,
            "all_seeds": seeds,
            "subseed": self.subseed,
            "all_subseeds": [self.subseed + i for i in range(self.images)],
            "subseed_strength": 0,
            "width": sdcn["width"],
            "height": sdcn["height"],
            "sampler_name": sampler,
            "cfg_scale": float(sdcn["cfg_scale"]),
            "steps": sdcn["steps"],
            "batch_size": self.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model_name,
            "sd_model_hash": model_hash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": denoising,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(now)),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": AGENT_VERSION,
            "sdcn": {**summary, "jobs": jobs},
        }


def parse_request(
    kind: str,
    body: Mapping[str, Any],
    *,
    default_model: str | None,
    adverts: Iterable[Advert],
    rng: random.Random,
) -> A1111Request:
    """Check an A1111 txt2img or img2img body (parsed JSON) and translate it.

    `adverts` are those the gateway holds, to resolve the model; `rng` draws the seed of a
    request with seed -1. The init image is not decoded here (see `A1111Request.job`).
    Raises JobError("bad_request", "<field>: ...").
    """
    if not isinstance(body, Mapping):
        raise _bad("request", "must be a JSON object")
    given = {key: value for key, value in body.items() if value is not None}
    _check_fields(kind, given)
    override = given.get("override_settings", {})
    if not isinstance(override, Mapping):
        raise _bad("override_settings", "must be an object")
    checkpoint = _check_settings(override, "override_settings.")
    model = _resolve_model(checkpoint, default_model, adverts)

    images, batch_size, n_iter = _image_count(given)
    seed = _int_field(given, "seed", -1)
    if not -1 <= seed <= MAX_SEED - (images - 1):
        raise _bad("seed", f"must be -1 or from 0 to {MAX_SEED - (images - 1)}, got {seed}")
    if seed == -1:
        seed = rng.randrange(MAX_SEED + 2 - images)
    subseed = given.get("subseed")
    subseed = subseed if type(subseed) is int and 0 <= subseed <= MAX_SEED else seed

    prompt = given.get("prompt", "")
    negative_prompt = given.get("negative_prompt", "")
    sdcn_prompt, loras = prompt, []
    if isinstance(prompt, str):
        sdcn_prompt, loras = _take_loras(prompt)
        if given.get("disable_extra_networks") is True:
            loras = []

    sdcn: dict[str, Any] = {
        "model": model.name if isinstance(model, ModelInfo) else model,
        "prompt": sdcn_prompt,
        "negative_prompt": negative_prompt,
        "loras": loras,
        "seed": seed,
        "sampler_name": _sampler(given),
        "steps": _as_int(given.get("steps", _DEFAULTS["steps"])),
        "cfg_scale": given.get("cfg_scale", _DEFAULTS["cfg_scale"]),
        "width": _as_int(given.get("width", _DEFAULTS["width"])),
        "height": _as_int(given.get("height", _DEFAULTS["height"])),
        "batch_size": min(images, MAX_BATCH_SIZE),
    }
    if kind == "img2img":
        sdcn["init_image"] = _init_image(given)
        sdcn["denoising_strength"] = given.get(
            "denoising_strength", _DEFAULTS["denoising_strength"]
        )

    parameters = dict(body)
    if not body.get("include_init_images"):
        for name in ("init_images", "mask"):
            if name in parameters:
                parameters[name] = None
    return A1111Request(
        kind=kind,
        sdcn=sdcn,
        images=images,
        batch_size=batch_size,
        n_iter=n_iter,
        seed=seed,
        subseed=subseed,
        prompt=prompt if isinstance(prompt, str) else "",
        negative_prompt=negative_prompt if isinstance(negative_prompt, str) else "",
        model=model if isinstance(model, ModelInfo) else None,
        send_images=given.get("send_images") is not False,
        parameters=parameters,
        task_id=_task_id(given),
    )


def _check_fields(kind: str, given: Mapping[str, Any]) -> None:
    unknown = sorted(str(name) for name in given if name not in _KNOWN)
    if unknown:
        listed = ", ".join(name[:40] for name in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        plural = "s" if len(unknown) > 1 else ""
        raise _bad(listed + more, f"unknown field{plural} (not part of the A1111 API)")
    if kind == "txt2img":
        for name in sorted(_IMG2IMG_ONLY & given.keys()):
            if not _empty(given[name]):
                raise _bad(name, "only allowed for img2img")
    for name, (neutral, why) in _NEUTRAL.items():
        if name in given and not neutral(given[name]):
            raise _bad(name, f"{why} (got {json.dumps(given[name], default=str)[:40]})")
    for name in ("send_images", "include_init_images", "disable_extra_networks"):
        if name in given and type(given[name]) is not bool:
            raise _bad(name, "must be a boolean")


def _task_id(given: Mapping[str, Any]) -> str | None:
    task_id = given.get("force_task_id")
    if task_id is None or task_id == "":
        return None
    if not isinstance(task_id, str) or len(task_id) > MAX_TASK_ID_CHARS:
        raise _bad("force_task_id", f"must be a string of at most {MAX_TASK_ID_CHARS} characters")
    return task_id


def _check_settings(settings: Mapping[str, Any], prefix: str) -> str | None:
    """Refuse settings the network cannot honour; return the checkpoint asked for, if any."""
    for key, value in settings.items():
        if key == _CHECKPOINT or key in _HARMLESS_SETTINGS or value is None:
            continue
        allowed = _DEFAULT_SETTINGS.get(key)
        if allowed is None:
            raise _bad(f"{prefix}{key!s:.60}", "is not a setting the network can apply")
        if not _is(*allowed)(value):
            wanted = " or ".join(json.dumps(v) for v in allowed)
            raise _bad(f"{prefix}{key}", f"providers run the default; send {wanted}")
    checkpoint = settings.get(_CHECKPOINT)
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
        raise _bad(prefix + _CHECKPOINT, "must be a model name or title")
    return checkpoint


def _resolve_model(
    checkpoint: str | None, default_model: str | None, adverts: Iterable[Advert]
) -> ModelInfo | str:
    wanted = checkpoint or default_model
    if wanted is None:
        raise _bad(
            "override_settings.sd_model_checkpoint",
            "no model asked for, and the gateway has no default model "
            "(set one with POST /sdapi/v1/options)",
        )
    return find_model(wanted, adverts) or wanted


def _image_count(given: Mapping[str, Any]) -> tuple[int, int, int]:
    batch_size = _int_field(given, "batch_size", 1)
    n_iter = _int_field(given, "n_iter", 1)
    for name, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if not 1 <= value <= MAX_IMAGES:
            raise _bad(name, f"must be from 1 to {MAX_IMAGES}, got {value}")
    images = batch_size * n_iter
    if images > MAX_IMAGES:
        raise _bad("batch_size", f"batch_size * n_iter must be at most {MAX_IMAGES}, got {images}")
    return images, batch_size, n_iter


def _as_int(value: Any) -> Any:
    """512.0 as 512, as the webui's pydantic takes it; anything else as it is, for JobRequest
    to refuse by name.
    """
    return int(value) if type(value) is float and value.is_integer() else value


def _int_field(given: Mapping[str, Any], name: str, default: int) -> int:
    """An int field the translation itself needs."""
    value = _as_int(given.get(name, default))
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {json.dumps(value, default=str)[:40]}")
    return value


def _take_loras(prompt: str) -> tuple[str, list[list[Any]]]:
    """Take the ``<lora:name:weight>`` tags out of `prompt`; return the rest and the LoRAs."""
    loras: dict[str, float] = {}

    def take(match: re.Match[str]) -> str:
        kind, args = match["kind"].lower(), match["args"].split(":")
        if kind == "hypernet":
            raise _bad("prompt", f"{match[0]!r:.60}: hypernetworks are not available")
        if kind not in ("lora", "lyco"):
            return match[0]  # not an extra network the webui knows: text, as it is there
        name = args[0].strip()
        weights = [a.strip() for a in args[1:]]
        if not name:
            raise _bad("prompt", f"{match[0]!r:.60} names no LoRA")
        if len(weights) > 1 and len(set(weights)) > 1:
            raise _bad(
                "prompt",
                f"{match[0]!r:.60}: separate text encoder and UNet weights are not supported",
            )
        weight = _weight(match[0], weights[0] if weights else "")
        if name in loras:
            raise _bad("prompt", f"LoRA {name!r:.60} is tagged twice")
        if len(loras) == MAX_LORAS:
            raise _bad("prompt", f"at most {MAX_LORAS} LoRAs are allowed")
        loras[name] = weight
        return ""

    rest = _EXTRA_NETWORK.sub(take, prompt)
    return rest.strip(), [[name, weight] for name, weight in loras.items()]


def _weight(tag: str, text: str) -> float:
    if not text:
        return 1.0  # the webui's default multiplier
    try:
        weight = float(text)
    except ValueError:
        raise _bad("prompt", f"{tag!r:.60}: the weight must be a number") from None
    if not -5 <= weight <= 5:  # also refuses NaN
        raise _bad("prompt", f"{tag!r:.60}: the weight must be from -5 to 5")
    return weight


def _sampler(given: Mapping[str, Any]) -> Any:
    """The SDCN sampler name: the sampler's, with the scheduler's label after it if any."""
    sampler = given.get("sampler_name") or given.get("sampler_index") or DEFAULT_SAMPLER
    scheduler = given.get("scheduler")
    if scheduler is None or not isinstance(sampler, str):
        return sampler
    if not isinstance(scheduler, str):
        raise _bad("scheduler", "must be a string")
    if scheduler.strip().lower() in ("", "automatic"):
        return sampler
    label = _scheduler_label(scheduler)
    if label is None:
        raise _bad("scheduler", f"unknown scheduler {scheduler!r:.40} (see /sdapi/v1/schedulers)")
    if split_sampler(sampler)[1] is not None:
        return sampler  # "DPM++ 2M Karras" names one already, which wins as in the webui
    return f"{sampler} {label}"


def _scheduler_label(text: str) -> str | None:
    wanted = text.strip().lower().replace(" ", "_")
    for label, name in SCHEDULERS.items():
        if wanted in (name, label.lower().replace(" ", "_"), name.replace("_", "")):
            return label
    return None


def _init_image(given: Mapping[str, Any]) -> Any:
    images = given.get("init_images")
    if images is None or images == []:
        raise _bad("init_images", "is required for img2img")
    if not isinstance(images, list):
        raise _bad("init_images", "must be an array of base64 images")
    if len(images) > 1:
        # The webui gives each image of the batch its own init image: the network cannot.
        raise _bad("init_images", f"only one image is supported, got {len(images)}")
    return images[0]


_RENAMES = (
    ("init_image:", "init_images[0]:"),
    ("model:", "override_settings.sd_model_checkpoint:"),
)


def _a1111_names(message: str) -> str:
    """Name an SDCN field in `message` as the A1111 request names it."""
    for sdcn, a1111 in _RENAMES:
        if message.startswith(sdcn):
            return a1111 + message[len(sdcn) :]
    return message


# --- options ---------------------------------------------------------------------------------


def options(default_model: str | None, adverts: Iterable[Advert]) -> dict[str, Any]:
    """``GET /sdapi/v1/options``: the default model (as its webui title) and the settings
    providers run with.
    """
    model = find_model(default_model, adverts) if default_model else None
    checkpoint = model_title(model) if model else default_model
    return {
        _CHECKPOINT: checkpoint,
        "sd_checkpoint_hash": model.hash or None if model else None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "sd_vae": "Automatic",
        "randn_source": "GPU",
        "token_merging_ratio": 0,
        "img2img_fix_steps": False,
    }


def parse_options(body: Any, adverts: Iterable[Advert]) -> str | None:
    """Check a ``POST /sdapi/v1/options`` body; return the model name to make the default, or
    None if it sets none.

    The model must be advertised (by name, title or hash). Settings the network cannot apply
    are refused rather than ignored, so nothing is set unless all of it can be.
    Raises JobError("bad_request", ...).
    """
    if not isinstance(body, Mapping):
        raise _bad("request", "must be a JSON object of settings")
    checkpoint = _check_settings(body, "")
    if checkpoint is None:
        return None
    model = find_model(checkpoint, adverts)
    if model is None:
        raise _bad(_CHECKPOINT, f"no provider offers model {checkpoint!r:.80}")
    return model.name


# --- progress ----------------------------------------------------------------------------------


def progress(jobs: Sequence[JobState], *, interrupted: bool) -> dict[str, Any]:
    """``GET /sdapi/v1/progress`` for a client whose jobs in flight are `jobs`.

    As the webui: ``progress`` 0 to 1 over all their images, ``eta_relative`` in seconds,
    ``state`` with ``job_count`` (jobs dispatched: an A1111 request of more than
    MAX_BATCH_SIZE images makes several), ``job_no`` (those finished), and the steps of the
    first unfinished one; ``current_image`` is always null (providers send no previews).
    `interrupted`: whether the client interrupted its jobs since it last started one.
    """
    state: dict[str, Any] = {
        "skipped": False,
        "interrupted": interrupted,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    answer: dict[str, Any] = {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": state,
        "current_image": None,
        "textinfo": None,
    }
    parts = [part for job in jobs for part in job.parts]
    if not parts:
        return answer
    finished = [total > 0 and step >= total for step, total in parts]
    step, total = next(
        (part for part, done in zip(parts, finished, strict=True) if not done), parts[-1]
    )
    first = min(jobs, key=lambda job: job.created_at)
    state.update(
        job=first.kind,
        job_count=len(parts),
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(first.created_at)),
        job_no=sum(finished),
        sampling_step=step,
        sampling_steps=total,
    )
    done = sum(min(step / total, 1.0) for step, total in parts if total > 0)
    answer["progress"] = round(done / len(parts), 4)
    answer["eta_relative"] = max((job.eta_s or 0.0 for job in jobs), default=0.0)
    return answer
