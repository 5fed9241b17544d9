"""cosmiclite.models: SD-shaped architectures from configs, toy pipeline save/load, offline checkpoint errors."""
import pytest
import torch

from cosmiclite import models

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_toy_components_build_and_forward_shapes():
    c = models.toy_components(seed=0)
    assert set(c) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert 3.0e6 < models.count_parameters(c["unet"]) < 3.5e6  # the ~3.2 M toy recipe
    ids = c["tokenizer"]("a woman with red hair", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406
    with torch.no_grad():
        text = c["text_encoder"](ids)[0]
        assert text.shape == (1, 77, 128)
        latent = c["vae"].encode(torch.randn(1, 3, 64, 64)).latent_dist.mean
        assert latent.shape == (1, 4, 16, 16)
        assert c["vae"].decode(latent).sample.shape == (1, 3, 64, 64)
        assert c["unet"](latent, 500, text).sample.shape == (1, 4, 16, 16)
    # pitfall: DDIM must not clip samples on the toy schedule
    assert c["scheduler"].config.clip_sample is False
    assert type(models.training_scheduler(c["scheduler"])).__name__ == "DDPMScheduler"


def test_toy_components_are_seeded():
    a, b, c = models.build_unet("toy", 0), models.build_unet("toy", 0), models.build_unet("toy", 1)
    pa, pb, pc = (next(iter(m.parameters())) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("arch,unet,vae,text,text2", [
    ("sd15", 859_520_964, 83_653_863, 123_060_480, None),        # runwayml/stable-diffusion-v1-5
    ("sdxl", 2_567_463_684, 83_653_863, 123_060_480, 694_659_840),  # stable-diffusion-xl-base-1.0
])
def test_real_architectures_have_the_published_sizes(arch, unet, vae, text, text2):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    a = models.architecture(arch)
    with torch.device("meta"):  # shapes only: no memory, no init time
        assert models.count_parameters(UNet2DConditionModel(**a.unet)) == unet
        assert models.count_parameters(AutoencoderKL(**a.vae)) == vae
        assert models.count_parameters(CLIPTextModel(CLIPTextConfig(**a.text_encoder))) == text
        if text2:
            m = CLIPTextModelWithProjection(CLIPTextConfig(**a.text_encoder_2))
            assert models.count_parameters(m) == text2
    assert a.image_size == (512 if arch == "sd15" else 1024)


def test_save_load_round_trip(tmp_path):
    pipe = models.build_pipeline("toy", seed=3)
    models.save_pipeline(pipe, tmp_path / "toy")
    assert (tmp_path / "toy" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    back = models.load_toy_pipeline(tmp_path / "toy")
    assert type(back).__name__ == "StableDiffusionPipeline" and back.safety_checker is None
    assert back.scheduler.config.clip_sample is False
    x, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 128)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, 10, t).sample, back.unet(x, 10, t).sample)
    ids = back.tokenizer("red hair").input_ids
    assert ids == pipe.tokenizer("red hair").input_ids


def test_tiny_sdxl_pipeline_round_trip(tmp_path):
    pipe = models.build_pipeline("tiny-sdxl")
    models.save_pipeline(pipe, tmp_path / "xl")
    back = models.load_pipeline(tmp_path / "xl")
    assert type(back).__name__ == "StableDiffusionXLPipeline"
    # a UNet-only checkpoint (CosmicMan's layout: config.json at the root) replaces the base UNet
    other = models.build_unet("tiny-sdxl", seed=7)
    other.save_pretrained(tmp_path / "unet_only")
    swapped = models.load_pipeline(tmp_path / "xl", unet=tmp_path / "unet_only")
    p0 = next(iter(swapped.unet.parameters()))
    assert torch.equal(p0, next(iter(other.parameters())))
    assert not torch.equal(p0, next(iter(back.unet.parameters())))


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(models.WeightsNotFoundError) as e:
        models.load_pipeline("cosmicman-sdxl")
    msg = str(e.value)
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0" in msg and "--local-dir" in msg
    with pytest.raises(models.WeightsNotFoundError, match="huggingface-cli download cosmicman/CosmicMan-SD"):
        models.load_unet("cosmicman-sd")
    with pytest.raises(models.WeightsNotFoundError, match="model_index.json"):
        models.load_pipeline(tmp_path)  # a folder, but not a pipeline
    with pytest.raises(models.WeightsNotFoundError, match="no trained toy model"):
        models.load_toy_pipeline(tmp_path / "nowhere")
    with pytest.raises(models.WeightsNotFoundError, match="neither an existing folder nor a hub id"):
        models.load_pipeline("not-a-model")


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="sd15"):
        models.architecture("sd3")


def test_a_stock_stable_diffusion_pipeline_generates_from_the_shipped_toy_model():
    """What a diffusers user tries first: no kit code, no dtype argument, no cast."""
    import torch
    from diffusers import StableDiffusionPipeline

    from cosmiclite.models import TOY_MODEL_DIR
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    out = pipe("A full-body shot, red t-shirt, blue jeans.", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and 0.0 <= out.images.min() <= out.images.max() <= 1.0
