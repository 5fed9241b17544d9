"""cosmiclite.attention: captured maps are Eq. 2, the stores behave, the model is left stock."""
import math

import pytest
import torch

from cosmiclite import attention as A
from cosmiclite import models

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def unet():
    return models.build_unet("tiny-sd15", seed=0).eval()  # cross-attention at 16x16 and 8x8, 2 heads


def _inputs(batch=2, seed=0, dim=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, dim, generator=g)


def test_captured_maps_equal_softmax_recomputed_from_the_layer(unet):
    """M = Softmax(Q K^T / sqrt(d)) from each layer's own to_q/to_k and its actual inputs (grabbed by hooks)."""
    inputs, hooks = {}, []
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            def grab(mod, args, kwargs, name=name):
                inputs[name] = (args[0].detach(), kwargs["encoder_hidden_states"].detach())
            hooks.append(mod.register_forward_pre_hook(grab, with_kwargs=True))
    x, c = _inputs()
    with A.capture_cross_attention(unet, "training", resolutions=(8, 16)) as store, torch.no_grad():
        unet(x, 10, c)
        maps, layers = store.maps(), store.layers
    for h in hooks:
        h.remove()
    n_checked = 0
    for res in (8, 16):
        assert len(maps[res]) == len(layers[res]) > 0
        for M, pname in zip(maps[res], layers[res]):
            mod = unet.get_submodule(pname.removesuffix(".processor"))
            hs, ehs = inputs[pname.removesuffix(".processor")]
            B, N, _ = hs.shape
            q = mod.to_q(hs).view(B, N, mod.heads, -1).transpose(1, 2)      # (B, heads, N, d)
            k = mod.to_k(ehs).view(B, 77, mod.heads, -1).transpose(1, 2)    # (B, heads, 77, d)
            ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            assert M.shape == (B, mod.heads, res * res, 77)
            torch.testing.assert_close(M, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(M.sum(-1), torch.ones_like(M[..., 0]))  # rows sum to 1 over 77 tokens
            n_checked += 1
    assert n_checked == len(A.cross_attention_layers(unet))  # tiny-sd15: every attn2 is at 8 or 16


def test_processors_restored_and_output_bit_identical(unet):
    x, c = _inputs()
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        stock = unet(x, 10, c).sample
        with A.capture_cross_attention(unet, "inference") as store:
            captured = unet(x, 10, c).sample
            kinds = {type(v).__name__ for k, v in unet.attn_processors.items() if k.endswith("attn1.processor")}
            assert kinds == {"AttnProcessor2_0"}  # self-attention keeps SDPA
        after = unet(x, 10, c).sample
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert torch.equal(after, stock)
    torch.testing.assert_close(captured, stock, rtol=1e-4, atol=1e-5)  # eager attn2 = SDPA up to rounding
    assert store.token_maps()  # and something was captured


def test_processors_restored_after_an_exception(unet):
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with A.capture_cross_attention(unet, "training"):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_gradient_flows_from_map_loss_into_lora_of_to_q_and_to_k():
    from peft import LoraConfig
    net = models.build_unet("tiny-sd15", seed=1)
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights="gaussian"))
    x, c = _inputs(batch=1)
    with A.capture_cross_attention(net, "training", resolutions=(8,), head_mean=True) as store:
        net(x, 10, c)
        maps = store.maps()[8]
    target = torch.zeros(8 * 8)
    target[:32] = 1.0
    loss = sum(((m[:, :, :, 5] - target) ** 2).mean() for m in maps)  # a HOLA-like loss on token 5's map
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if "lora" in n}
    hit = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    # tiny-sd15's only 8x8 cross-attention is the mid block's: its to_q and to_k LoRA get gradient ...
    mid = {n for n in grads if n.startswith("mid_block") and ".attn2.to_" in n and "lora_B" in n}
    assert len(mid) == 2 and mid <= hit
    # ... and so does what feeds its queries (earlier layers), but nothing after it (the up blocks)
    assert not any(n.startswith("up_blocks") for n in hit)
    assert any(n.startswith("down_blocks.0") for n in hit)


def test_guidance_batch_keeps_only_the_conditional_half(unet):
    x, c = _inputs(batch=1, seed=1)
    _, uncond = _inputs(batch=1, seed=2)
    with torch.no_grad():
        stock = unet(torch.cat([x, x]), 10, torch.cat([uncond, c])).sample
        with A.capture_cross_attention(unet, "inference", guidance_batch=True) as both:
            split = unet(torch.cat([x, x]), 10, torch.cat([uncond, c])).sample  # diffusers' order: [uncond, cond]
        torch.testing.assert_close(split, stock, rtol=1e-4, atol=1e-5)  # SDPA half + eager half = stock
        with A.capture_cross_attention(unet, "inference") as cond_only:
            unet(x, 10, c)
        with A.capture_cross_attention(unet, "inference") as uncond_only:
            unet(x, 10, uncond)
    for r, m in both.token_maps().items():
        assert m.shape[1] == 1
        torch.testing.assert_close(m, cond_only.token_maps()[r], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(m, uncond_only.token_maps()[r])


def test_inference_memory_is_bounded_and_per_step_grows(unet):
    x, c = _inputs(batch=1)

    def run(steps, **kw):
        with torch.no_grad(), A.capture_cross_attention(unet, "inference", **kw) as s:
            for t in range(steps):
                unet(x, 999 - t, c)
        return s

    short, long = run(2), run(5)
    assert short.nbytes() == long.nbytes() > 0
    # (8*8 + 16*16) cells x 77 tokens x 4 bytes: one head/layer/step mean per resolution
    assert long.nbytes() == (64 + 256) * 77 * 4
    assert long.token_maps()[16].shape == (1, 1, 77, 16, 16)
    groups_only = run(3, spans=[(1, 3), (4, 6)], keep_tokens=False)
    assert groups_only.nbytes() == (64 + 256) * 2 * 4  # O(groups x res^2)
    per_step = run(3, per_step=True)
    assert per_step.nbytes() == 3 * long.nbytes() and per_step.timesteps == [999, 998, 997]
    assert per_step.token_maps()[8].shape == (3, 1, 77, 8, 8)
    # the averaged maps are the mean of the per-step ones
    every = run(3)
    torch.testing.assert_close(every.token_maps()[8][0], per_step.token_maps()[8].mean(0))


def test_group_maps_are_span_means_hand_worked():
    tok = torch.zeros(2, 2, 77)  # 2 cells
    tok[0, 0, 3], tok[0, 0, 4], tok[0, 0, 5] = 0.3, 0.6, 0.9
    tok[1, 1, 10] = 0.4
    g = A.group_maps(tok, [(3, 6), (10, 11)])
    assert g.shape == (2, 2, 2)
    torch.testing.assert_close(g[0, 0], torch.tensor([0.6, 0.0]))      # (0.3 + 0.6 + 0.9) / 3
    torch.testing.assert_close(g[1, 1], torch.tensor([0.0, 0.4]))
    with pytest.raises(ValueError, match="spans\\[0\\]"):
        A.group_maps(tok, [(6, 3)])


def test_store_group_maps_match_group_maps_of_token_maps(unet):
    x, c = _inputs(batch=1)
    spans = [(1, 4), (4, 5), (5, 9)]
    with torch.no_grad(), A.capture_cross_attention(unet, "inference", spans=spans) as s:
        unet(x, 5, c)
        unet(x, 4, c)
    for r, g in s.group_maps().items():
        torch.testing.assert_close(g, A.group_maps(s.token_maps()[r], spans, token_dim=2))


def test_mass_in_mask_hand_worked():
    m = torch.zeros(1, 2, 2)
    m[0, 0, 0], m[0, 1, 1] = 3.0, 1.0
    h = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(A.mass_in_mask(m, h), torch.tensor([0.75]))
    uniform = torch.ones(1, 4, 4)
    half = torch.zeros(1, 4, 4)
    half[0, :2] = 1
    torch.testing.assert_close(A.mass_in_mask(uniform, half), torch.tensor([0.5]))  # = the mask's area
    with pytest.raises(ValueError, match="resolution"):
        A.mass_in_mask(torch.ones(1, 8, 8), torch.ones(1, 4, 4))


def test_sdxl_unet_maps_over_77_tokens():
    net = models.build_unet("tiny-sdxl", seed=0).eval()  # cross-attention at 8x8 and 4x4 of a 16x16 latent
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    with torch.no_grad(), A.capture_cross_attention(net, "inference", resolutions=(4, 8), guidance_batch=True) as s:
        net(x, 10, c, added_cond_kwargs=added)
    maps = s.token_maps()
    assert set(maps) == {4, 8} and maps[8].shape == (1, 1, 77, 8, 8)
    torch.testing.assert_close(maps[4].sum(2), torch.ones(1, 1, 4, 4))


def test_default_resolutions():
    assert A.default_resolutions(64) == (16, 32)   # SD 1.5 at 512 px: 1/32 and 1/16 of the image side
    assert A.default_resolutions(128) == (32, 64)  # SDXL at 1024 px
    assert A.default_resolutions(16) == (8, 16)    # the toy model at 64 px


def test_generate_result_save_load_round_trip(tmp_path):
    pipe = models.build_pipeline("tiny-sd15")
    r = A.generate_with_attention(pipe, "a woman with red hair", [("hair", (4, 6)), ("body", (1, 3))], steps=2,
                                  per_step=True, resolutions=(8, 16))
    assert r.tokens == ["<|startoftext|>", "a", "woman", "with", "red", "hair", "<|endoftext|>"]
    assert r.image.shape == (32, 32, 3) and r.group_maps[16].shape == (2, 2, 16, 16)
    path = r.save(tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"timesteps", "image", "group/hair/res8", "group/body/res8", "group/hair/res16",
                                 "group/body/res16", "tokens/res8", "tokens/res16"}
        assert f.get_slice("tokens/res16").get_shape() == [2, 7, 16, 16]
    back = A.AttentionResult.load(path)
    assert back.groups == r.groups and back.tokens == r.tokens
    torch.testing.assert_close(back.group_map("hair", 16, step=1), r.group_map("hair", 16, step=1))


def test_cli_generate_writes_image_and_documented_maps(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    from cosmiclite.cli import main
    models.save_pipeline(models.build_pipeline("tiny-sd15"), tmp_path / "model")
    out = tmp_path / "out"
    rc = main(["generate", "--prompt", "a woman with red hair and blue jeans", "--model", str(tmp_path / "model"),
               "--steps", "2", "--out", str(out / "img.png"), "--attention", str(out / "a.safetensors"),
               "--attention-png", str(out / "a.png"), "--per-token", "--per-step", "--quiet"])
    assert rc == 0
    assert (out / "img.png").exists() and (out / "a.png").exists() and (out / "a-tokens.png").exists()
    with safe_open(str(out / "a.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"group/hair/res16", "group/bottoms/res8", "tokens/res16", "timesteps"} <= keys
        assert f.get_slice("group/hair/res16").get_shape() == [2, 16, 16]  # (T, r, r) with --per-step
    r = A.AttentionResult.load(out / "a.safetensors")
    assert "hair" in r.group_names and r.tokens[-1] == "<|endoftext|>"
    # without --model and no shipped toy model: a clear message, exit status 2
    monkeypatch.setattr(models, "TOY_MODEL_DIR", tmp_path / "no_toy")
    assert main(["generate", "--prompt", "red hair", "--out", str(out / "x.png")]) == 2
    assert "no trained toy model" in capsys.readouterr().err


def test_asking_for_a_resolution_the_unet_lacks_is_explained(unet):
    x, c = _inputs(batch=1)
    with torch.no_grad(), A.capture_cross_attention(unet, "inference", resolutions=(32,)) as s:
        unet(x, 1, c)
    with pytest.raises(ValueError, match=r"ran at \[8, 16\]"):
        s.token_maps()


def test_mass_in_masks_of_a_result_with_a_real_mask_set():
    from cosmiclite.masks import mask_set
    from cosmiclite.toyworld import render
    person = render(0)
    ms = mask_set(person.parsing, sizes=(8, 16))
    names = list(ms.names)
    hair, tops = ms.masks[16][names.index("hair")], ms.masks[16][names.index("tops")]
    on_hair = hair / hair.sum()                      # a map exactly on the hair mask
    uniform = torch.full((16, 16), 1 / 256)
    gm = {16: torch.stack([on_hair, uniform, on_hair], 0)[None], 8: torch.full((1, 3, 8, 8), 1 / 64)}
    r = A.AttentionResult("p", [], [("hair", (1, 2)), ("tops", (2, 3)), ("other", (3, 4))], [1.0], {}, gm)
    mass = r.mass_in_masks(ms)
    assert set(mass[16]) == {"hair", "tops"}  # "other" has no mask
    expected_hair = (on_hair * hair).sum()     # masks are soft at the borders: mass-weighted mask value
    torch.testing.assert_close(mass[16]["hair"], expected_hair[None])
    torch.testing.assert_close(mass[16]["tops"], tops.mean()[None])  # uniform map: the mask's mean
    assert mass[16]["hair"].item() > 0.5 and mass[16]["hair"] > mass[8]["hair"]
