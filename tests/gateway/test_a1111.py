"""Translating AUTOMATIC1111 requests into SDCN jobs and shaping the webui's responses."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import pytest
from PIL import Image

from gateway.a1111 import (
    DEFAULT_SAMPLER,
    MAX_IMAGES,
    A1111Request,
    options,
    parse_options,
    parse_request,
)
from gateway.catalog import find_model
from sdcn_p2p._version import AGENT_VERSION
from sdcn_p2p.errors import JobError
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo
from sdcn_p2p.testing import MOCK_EPOCH, test_identity

V15 = ModelInfo(
    "v1-5-pruned-emaonly", "v1-5-pruned-emaonly.safetensors [6ce0161689]", "6ce0161689", "sd1"
)
XL = ModelInfo("sd_xl_base_1.0", "sd_xl_base_1.0.safetensors [31e35c80fc]", "31e35c80fc", "sdxl")
CARD = ModelInfo("card-a")


def advert(
    index: int,
    models: tuple[ModelInfo, ...],
    *,
    loras: tuple[str, ...] = (),
    samplers: tuple[str, ...] = ("Euler a", "DPM++ 2M"),
    state: str = "online",
    roles: tuple[str, ...] = ("provider",),
) -> Advert:
    return Advert(
        test_identity(index).peer_id,
        seq=1,
        issued_at=MOCK_EPOCH,
        ttl=600,
        models=models,
        loras=tuple(LoraInfo(name) for name in loras),
        samplers=samplers,
        state=state,
        roles=roles,
    )


ADVERTS = [
    advert(1, (V15, XL), loras=("pixel-art", "ink")),
    advert(2, (V15,), loras=("watercolor",), samplers=("Euler a", "DDIM")),
    advert(3, (CARD,), state="draining"),
    advert(4, (), roles=("gateway",)),
]


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


#: What the webui's own API model (1.10) holds with every field at its default: a client that
#: builds its payload from the model's schema sends all of it.
WEBUI_TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "styles": None,
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": None,
    "scheduler": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0.75,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "override_settings": None,
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "firstpass_image": None,
    "comments": None,
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2.0,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "force_task_id": None,
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "infotext": None,
}
WEBUI_IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in WEBUI_TXT2IMG_DEFAULTS.items() if not k.startswith(("hr_", "first"))},
    "init_images": None,
    "resize_mode": 0,
    "image_cfg_scale": None,
    "mask": None,
    "mask_blur_x": 4,
    "mask_blur_y": 4,
    "mask_blur": None,
    "mask_round": True,
    "inpainting_fill": 0,
    "inpaint_full_res": True,
    "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None,
    "latent_mask": None,
    "include_init_images": False,
}
del WEBUI_IMG2IMG_DEFAULTS["enable_hr"]


def webuiapi_txt2img(**fields: Any) -> dict[str, Any]:
    """The payload of the popular ``webuiapi`` client's ``txt2img()`` with its defaults."""
    payload = {
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "denoising_strength": 0.7,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 20,
        "cfg_scale": 7.0,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "sampler_index": "Euler a",
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    payload.update(fields)
    return payload


def webuiapi_img2img(**fields: Any) -> dict[str, Any]:
    """The payload of ``webuiapi``'s ``img2img()`` with its defaults and one image."""
    payload = {
        "init_images": ["data:image/png;base64," + base64.b64encode(png()).decode()],
        "resize_mode": 0,
        "denoising_strength": 0.75,
        "mask_blur": 4,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": 1,
        "prompt": "",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 20,
        "cfg_scale": 7.0,
        "image_cfg_scale": 1.5,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "sampler_index": "Euler a",
        "include_init_images": False,
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    payload.update(fields)
    return payload


def parse(kind: str = "txt2img", body: Any = None, **kwargs: Any) -> A1111Request:
    options: dict[str, Any] = {
        "default_model": "v1-5-pruned-emaonly",
        "adverts": ADVERTS,
        "rng": random.Random(0),
    }
    options.update(kwargs)
    return parse_request(kind, webuiapi_txt2img() if body is None else body, **options)


def refused(kind: str, body: Any, **kwargs: Any) -> str:
    """The message of the JobError("bad_request") the request gets, parsing or validating."""
    with pytest.raises(JobError) as info:
        parse(kind, body, **kwargs).job()
    assert info.value.code == "bad_request"
    return info.value.message


# --- whole payloads ----------------------------------------------------------------------------


def test_the_webuis_full_default_txt2img_payload_is_accepted() -> None:
    request = parse("txt2img", {**WEBUI_TXT2IMG_DEFAULTS, "prompt": "a lighthouse"})
    job = request.job()
    assert job.model == "v1-5-pruned-emaonly" and job.prompt == "a lighthouse"
    # The webui API's defaults, not the SDCN API's.
    assert (job.steps, job.cfg_scale, job.width, job.height) == (50, 7.0, 512, 512)
    assert job.sampler_name == DEFAULT_SAMPLER == "Euler"
    assert job.batch_size == 1 and job.loras == () and 0 <= job.seed < 2**32


def test_the_webuis_full_default_img2img_payload_is_accepted() -> None:
    body = {
        **WEBUI_IMG2IMG_DEFAULTS,
        "init_images": [base64.b64encode(png()).decode()],
        "override_settings": {"sd_model_checkpoint": XL.title},
    }
    job = parse("img2img", body).job()
    assert job.kind == "img2img" and job.model == "sd_xl_base_1.0"
    assert job.init_image == png() and job.denoising_strength == 0.75


def test_the_webuiapi_clients_payloads_are_accepted() -> None:
    job = parse("txt2img", webuiapi_txt2img(prompt="a cat", steps=20)).job()
    assert (job.prompt, job.steps, job.sampler_name) == ("a cat", 20, "Euler a")
    job = parse("img2img", webuiapi_img2img(denoising_strength=0.3)).job()
    assert job.init_image == png() and job.denoising_strength == 0.3


def test_null_means_the_default_and_integral_floats_are_integers() -> None:
    job = parse("txt2img", {"prompt": None, "steps": None, "width": 512.0, "seed": 3.0}).job()
    assert (job.prompt, job.steps, job.width, job.seed) == ("", 50, 512, 3)


# --- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("enable_hr", True),
        ("restore_faces", True),
        ("tiling", True),
        ("styles", ["cinematic"]),
        ("subseed_strength", 0.3),
        ("seed_resize_from_h", 768),
        ("seed_resize_from_w", 768),
        ("eta", 0.5),
        ("s_min_uncond", 0.2),
        ("s_churn", 1.0),
        ("s_tmin", 0.1),
        ("s_tmax", 10),
        ("s_noise", 1.003),
        ("refiner_checkpoint", "sd_xl_refiner_1.0"),
        ("script_name", "x/y/z plot"),
        ("alwayson_scripts", {"ControlNet": {"args": [{"enabled": True}]}}),
        ("infotext", "a cat\nSteps: 20, Sampler: Euler"),
        ("distilled_cfg_scale", 3.5),
        ("init_images", ["aGVsbG8="]),
        ("send_images", "yes"),
        ("seed", 2**32),
        ("seed", -2),
        ("seed", "42"),
        ("batch_size", 0),
        ("n_iter", MAX_IMAGES + 1),
        ("scheduler", "Bogus"),
        ("steps", 0),
        ("steps", 20.5),
        ("cfg_scale", "high"),
        ("width", 100),
        ("height", 4096),
        ("sampler_name", 5),
        ("negative_prompt", ["a", "b"]),
        ("prompt", "p" * 9000),
    ],
)
def test_a_txt2img_field_the_network_cannot_honour_is_refused_by_name(
    field: str, value: Any
) -> None:
    assert refused("txt2img", webuiapi_txt2img(**{field: value})).startswith(field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mask", "aGVsbG8="),
        ("latent_mask", "aGVsbG8="),
        ("resize_mode", 1),
        ("initial_noise_multiplier", 0.5),
        ("denoising_strength", 1.5),
        ("init_images", []),
        ("init_images", ["a", "b"]),
        ("init_images", "aGVsbG8="),
        ("init_images[0]", ["bm90IGFuIGltYWdl"]),
    ],
)
def test_an_img2img_field_the_network_cannot_honour_is_refused_by_name(
    field: str, value: Any
) -> None:
    name = field.removesuffix("[0]")
    assert refused("img2img", webuiapi_img2img(**{name: value})).startswith(field)


def test_too_many_images_in_all_are_refused() -> None:
    message = refused("txt2img", webuiapi_txt2img(batch_size=4, n_iter=5))
    assert message.startswith("batch_size") and "n_iter" in message


def test_unknown_fields_are_named() -> None:
    message = refused("txt2img", webuiapi_txt2img(foo=1, bar=2))
    assert message.startswith("bar, foo: unknown fields")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"CLIP_stop_at_last_layers": 2}, "override_settings.CLIP_stop_at_last_layers"),
        ({"sd_vae": "vae-ft-mse-840000.safetensors"}, "override_settings.sd_vae"),
        ({"eta_noise_seed_delta": 31337}, "override_settings.eta_noise_seed_delta"),
        ({"some_extension_setting": True}, "override_settings.some_extension_setting"),
        ({"sd_model_checkpoint": ""}, "override_settings.sd_model_checkpoint"),
        ("v1-5", "override_settings"),
    ],
)
def test_override_settings_that_change_the_picture_are_refused(settings: Any, named: str) -> None:
    assert refused("txt2img", webuiapi_txt2img(override_settings=settings)).startswith(named)


def test_override_settings_that_change_nothing_are_accepted() -> None:
    settings = {
        "sd_model_checkpoint": "sd_xl_base_1.0",
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
        "samples_format": "jpg",
        "save_to_dirs": True,
        "eta_noise_seed_delta": None,
    }
    assert parse("txt2img", webuiapi_txt2img(override_settings=settings)).job().model == XL.name


def test_no_model_and_no_default_model_is_refused() -> None:
    message = refused("txt2img", webuiapi_txt2img(), default_model=None)
    assert message.startswith("override_settings.sd_model_checkpoint")


# --- models, LoRAs, samplers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "sd_xl_base_1.0",
        "SD_XL_BASE_1.0",
        "sd_xl_base_1.0.safetensors [31e35c80fc]",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0.ckpt",
        "31e35c80fc",
        "renamed.safetensors [31e35c80fc]",
    ],
)
def test_a_checkpoint_is_found_by_name_title_file_name_or_hash(name: str) -> None:
    assert find_model(name, ADVERTS) == XL
    job = parse("txt2img", webuiapi_txt2img(override_settings={"sd_model_checkpoint": name})).job()
    assert job.model == XL.name


def test_an_unknown_checkpoint_is_passed_on_for_the_dispatcher_to_refuse() -> None:
    assert find_model("dreamshaper_8", ADVERTS) is None
    override = {"sd_model_checkpoint": "dreamshaper_8.safetensors [879db523c3]"}
    request = parse("txt2img", webuiapi_txt2img(override_settings=override))
    assert request.model is None
    assert request.job().model == "dreamshaper_8.safetensors [879db523c3]"


def test_lora_tags_become_loras_and_leave_the_prompt() -> None:
    prompt = "a cat, <lora:pixel-art:0.7> <LyCORIS:ink>, <lora:watercolor:-1.5:-1.5>"
    prompt = prompt.replace("LyCORIS", "lyco")
    request = parse("txt2img", webuiapi_txt2img(prompt=prompt))
    job = request.job()
    assert job.prompt == "a cat,  ,"
    assert job.loras == (("pixel-art", 0.7), ("ink", 1.0), ("watercolor", -1.5))
    assert request.prompt == prompt  # info keeps the tags, as the webui's does


def test_other_angle_brackets_stay_in_the_prompt() -> None:
    prompt = "a <3: heart> and <lora:> and <b>bold</b>"
    assert parse("txt2img", webuiapi_txt2img(prompt=prompt)).job().prompt == prompt


def test_disable_extra_networks_drops_lora_tags() -> None:
    body = webuiapi_txt2img(prompt="a cat <lora:pixel-art:0.7>", disable_extra_networks=True)
    job = parse("txt2img", body).job()
    assert job.prompt == "a cat" and job.loras == ()


@pytest.mark.parametrize(
    "tag",
    [
        "<lora:pixel-art:9>",
        "<lora:pixel-art:strong>",
        "<lora:pixel-art:0.5:1.0>",
        "<lora::0.5>",
        "<hypernet:anime:1>",
        "<lora:a:1><lora:a:1>",
        "".join(f"<lora:l{i}:1>" for i in range(9)),
    ],
)
def test_lora_tags_the_network_cannot_apply_are_refused(tag: str) -> None:
    assert refused("txt2img", webuiapi_txt2img(prompt=f"a cat {tag}")).startswith("prompt")


@pytest.mark.parametrize(
    ("sampler", "index", "scheduler", "expected"),
    [
        ("DPM++ 2M", None, "karras", "DPM++ 2M Karras"),
        ("DPM++ 2M", None, "Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M", None, "sgm_uniform", "DPM++ 2M SGM Uniform"),
        ("DPM++ 2M", None, "SGMUniform", "DPM++ 2M SGM Uniform"),
        ("DPM++ 2M", None, "Automatic", "DPM++ 2M"),
        ("DPM++ 2M", None, "", "DPM++ 2M"),
        ("DPM++ 2M Karras", None, "exponential", "DPM++ 2M Karras"),
        (None, "DDIM", None, "DDIM"),
        ("", "DDIM", None, "DDIM"),
        (None, None, None, "Euler"),
    ],
)
def test_sampler_and_scheduler_make_the_sdcn_sampler_name(
    sampler: str | None, index: str | None, scheduler: str | None, expected: str
) -> None:
    body = {"sampler_name": sampler, "sampler_index": index, "scheduler": scheduler}
    assert parse("txt2img", body).job().sampler_name == expected


# --- batches and seeds -------------------------------------------------------------------------


def test_batch_size_times_n_iter_images_are_split_into_jobs_with_consecutive_seeds() -> None:
    request = parse("txt2img", webuiapi_txt2img(seed=100, batch_size=3, n_iter=3))
    jobs = request.split(request.job())
    assert [(j.seed, j.batch_size) for j in jobs] == [(100, 4), (104, 4), (108, 1)]
    assert request.images == 9 and request.batch_size == 3 and request.n_iter == 3


def test_seed_minus_one_gets_a_seed_that_leaves_room_for_every_image() -> None:
    for index in range(50):
        body = webuiapi_txt2img(seed=-1, batch_size=4, n_iter=4)
        request = parse("txt2img", body, rng=random.Random(index))
        assert 0 <= request.seed <= 2**32 - 16
    request = parse("txt2img", webuiapi_txt2img(seed=2**32 - 2, batch_size=2))
    assert request.seed == 2**32 - 2
    assert refused("txt2img", webuiapi_txt2img(seed=2**32 - 2, batch_size=3)).startswith("seed")


# --- responses ---------------------------------------------------------------------------------


def provider_info(seed: int, provider: str = "12D3KooWProvider") -> dict[str, Any]:
    return {
        "seed": seed,
        "model": "v1-5-pruned-emaonly",
        "provider": provider,
        "queue_ms": 5,
        "run_ms": 900,
        "backend": "webui",
        "attempts": 2,
    }


def test_the_response_has_the_webuis_shape() -> None:
    prompt = "a cat <lora:ink:0.5>"
    body = webuiapi_txt2img(
        prompt=prompt,
        negative_prompt="blurry",
        seed=7,
        batch_size=2,
        n_iter=3,
        sampler_name="DPM++ 2M",
        scheduler="karras",
        width=64,
        height=64,
    )
    request = parse("txt2img", body)
    jobs = request.split(request.job())
    results = [([png()] * j.batch_size, provider_info(j.seed, f"p{i}")) for i, j in enumerate(jobs)]
    response = request.response(results, now=MOCK_EPOCH)
    assert set(response) == {"images", "parameters", "info"}
    assert len(response["images"]) == 6
    assert all(base64.b64decode(image, validate=True) == png() for image in response["images"])
    assert response["parameters"] == body
    info = json.loads(response["info"])
    assert info["prompt"] == prompt and info["all_prompts"] == [prompt] * 6
    assert info["negative_prompt"] == "blurry"
    assert info["seed"] == 7 and info["all_seeds"] == list(range(7, 13))
    assert len(info["all_subseeds"]) == 6
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 20, 7.0)
    assert info["sampler_name"] == "DPM++ 2M" and info["batch_size"] == 2
    assert info["sd_model_name"] == "v1-5-pruned-emaonly"
    assert info["sd_model_hash"] == "6ce0161689"
    assert info["denoising_strength"] is None and info["version"] == AGENT_VERSION
    assert len(info["job_timestamp"]) == 14 and info["job_timestamp"].isdigit()
    assert len(info["infotexts"]) == 6
    assert info["infotexts"][1].startswith(f"{prompt}\nNegative prompt: blurry\nSteps: 20, ")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][1]
    assert "Seed: 8, Size: 64x64" in info["infotexts"][1]
    sdcn = info["sdcn"]
    assert (sdcn["provider"], sdcn["attempts"], sdcn["queue_ms"], sdcn["run_ms"]) == (
        "p0",
        2,
        5,
        900,
    )
    assert [(j["provider"], j["seed"], j["images"]) for j in sdcn["jobs"]] == [
        ("p0", 7, 4),
        ("p1", 11, 2),
    ]


def test_img2img_responses_leave_out_the_init_image_unless_asked() -> None:
    body = webuiapi_img2img(seed=1, denoising_strength=0.4)
    request = parse("img2img", body)
    response = request.response([([png()], provider_info(1))], now=MOCK_EPOCH)
    assert response["parameters"]["init_images"] is None
    assert response["parameters"]["denoising_strength"] == 0.4
    assert json.loads(response["info"])["denoising_strength"] == 0.4
    body["include_init_images"] = True
    response = parse("img2img", body).response([([png()], provider_info(1))], now=MOCK_EPOCH)
    assert response["parameters"]["init_images"] == body["init_images"]


def test_send_images_false_returns_no_images() -> None:
    request = parse("txt2img", webuiapi_txt2img(seed=1, send_images=False))
    response = request.response([([png()], provider_info(1))], now=MOCK_EPOCH)
    assert response["images"] == [] and json.loads(response["info"])["all_seeds"] == [1]


# --- options ---------------------------------------------------------------------------------


def test_options_report_the_default_model_as_its_title() -> None:
    assert options("sd_xl_base_1.0", ADVERTS)["sd_model_checkpoint"] == XL.title
    assert options("sd_xl_base_1.0", ADVERTS)["sd_checkpoint_hash"] == XL.hash
    assert options("gone-model", ADVERTS)["sd_model_checkpoint"] == "gone-model"
    assert options(None, ADVERTS)["sd_model_checkpoint"] is None


def test_setting_options() -> None:
    assert parse_options({"sd_model_checkpoint": XL.title}, ADVERTS) == XL.name
    assert parse_options({"samples_format": "png", "CLIP_stop_at_last_layers": 1}, ADVERTS) is None
    for body, named in [
        ({"sd_model_checkpoint": "nope"}, "sd_model_checkpoint"),
        ({"sd_model_checkpoint": XL.name, "CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last"),
        ({"sd_model_checkpoint": XL.name, "new_setting": 1}, "new_setting"),
        ([XL.name], "request"),
    ]:
        with pytest.raises(JobError) as info:
            parse_options(body, ADVERTS)
        assert info.value.message.startswith(named)
