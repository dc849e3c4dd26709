"""The catalog (gateway.catalog): models, LoRAs, samplers and schedulers as a webui lists them."""

from __future__ import annotations

from gateway.catalog import find_model, lora_list, sampler_list, scheduler_list, sd_model_list
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


def test_sd_models_lists_each_online_model_once_as_the_webui_does() -> None:
    assert sd_model_list(ADVERTS) == [
        {
            "title": V15.title,
            "model_name": V15.name,
            "hash": "6ce0161689",
            "sha256": None,
            "filename": "v1-5-pruned-emaonly.safetensors",
            "config": None,
        },
        {
            "title": XL.title,
            "model_name": XL.name,
            "hash": "31e35c80fc",
            "sha256": None,
            "filename": "sd_xl_base_1.0.safetensors",
            "config": None,
        },
    ]


def test_loras_samplers_and_schedulers() -> None:
    assert [lo["name"] for lo in lora_list(ADVERTS)] == ["pixel-art", "ink", "watercolor"]
    assert lora_list(ADVERTS)[0] == {
        "name": "pixel-art",
        "alias": "pixel-art",
        "path": "pixel-art",
        "metadata": {},
    }
    assert sampler_list(ADVERTS) == [
        {"name": name, "aliases": [], "options": {}} for name in ("Euler a", "DPM++ 2M", "DDIM")
    ]
    schedulers = {s["name"]: s for s in scheduler_list()}
    assert schedulers["automatic"]["label"] == "Automatic"
    assert schedulers["karras"] == {
        "name": "karras",
        "label": "Karras",
        "aliases": None,
        "default_rho": 7.0,
        "need_inner_model": False,
    }
    assert schedulers["sgm_uniform"]["aliases"] == ["SGMUniform"]


def test_a_draining_providers_model_is_still_found_but_not_listed() -> None:
    assert find_model("card-a", ADVERTS) == CARD
    assert "card-a" not in [m["model_name"] for m in sd_model_list(ADVERTS)]
