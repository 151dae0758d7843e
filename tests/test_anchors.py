"""The anchor generator (engine/anchors.py) on tiny configs: sampler, image space, masking,
seeding, cache, folders, the anchor store, and a real-FLUX diffusers folder (tiny random pipeline)."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine import anchor_store as S
from engine import anchors as A
from engine import portable as P
from engine.text import TextFeatures

TINY = dict(image_size=8, fold=2, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), default_steps=4)


class TinyText:
    """A deterministic stand-in for MiniLM: one hashed vector per word, zero-padded, masked."""

    max_length = 8
    model_id = "tiny-text"

    def __call__(self, texts):
        words = [t.split()[: self.max_length] for t in texts]
        length = max(len(w) for w in words)
        tokens = torch.zeros(len(texts), length, 16)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                seed = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
                tokens[i, j] = torch.randn(16, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        sentence = torch.nn.functional.normalize(tokens.sum(1), dim=-1)
        return TextFeatures(tokens=tokens, mask=mask, sentence=sentence)


def tiny_folder(tmp_path, name="gen", seed=0):
    torch.manual_seed(seed)
    cfg = A.BuiltinConfig(**TINY)
    model = A.build_transformer(cfg)
    return A.save_builtin(tmp_path / name, model, cfg, {"note": "test"}), model, cfg


def test_sigmas_match_flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for n in (1, 2, 4, 28):
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))  # what FluxPipeline passes
        np.testing.assert_allclose(sched.sigmas.float().numpy(), P.flow_sigmas(n), atol=1e-6)
    with pytest.raises(A.AnchorError, match="steps"):
        P.flow_sigmas(0)


def test_euler_loop_equals_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = A.BuiltinConfig(**TINY)
    torch.manual_seed(0)
    model = A.build_transformer(cfg).eval()
    cond = A.Conditioning(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 16))
    ids = A.image_ids(4, 4)
    noise = torch.randn(2, 4, 48)
    ours = A.euler_sample(model, noise, cond, 3, ids)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3))
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            v = A.flux_velocity(model, x, (t / 1000).expand(2), cond, ids)
            x = sched.step(v, t, x, return_dict=False)[0]
    assert torch.allclose(ours, x, atol=1e-5)


def test_pixels_fold_and_pack_like_flux():
    from diffusers import FluxPipeline

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    lat = A.images_to_latents(images, 2)
    assert lat.shape == (2, 12, 4, 4) and lat.min() >= -1 and lat.max() <= 1
    packed = P.pack_latents(lat)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 12, 4, 4))
    assert np.array_equal(P.pack_latents(lat.numpy()), packed.numpy())  # one definition for numpy and torch
    assert torch.equal(A.image_ids(4, 4), FluxPipeline._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32))
    back = P.latents_to_images(P.unpack_latents(packed, 4, 4).numpy(), 2)
    assert np.array_equal(back, images)


def test_one_noise_source_for_every_sampler(tmp_path):
    """The built-in pipeline's starting noise is engine.portable.initial_noise (numpy's PCG64 seeded
    per prompt), packed: the same draw the ONNX Runtime path makes, whatever the device or batch."""
    folder, _, cfg = tiny_folder(tmp_path)
    gen = A.AnchorGenerator.load(folder, device="cpu", text_encoder=TinyText())
    seeds = [P.prompt_seed(p) for p in ("red circle", "blue square")]
    noise = gen.backend.noise(seeds)
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    expected = P.pack_latents(np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32)
                                        for s in seeds]))
    assert np.array_equal(noise.numpy(), expected) and noise.dtype == torch.float32
    assert np.array_equal(P.initial_noise(seeds[1:], shape)[0], P.initial_noise(seeds, shape)[1])


def test_padding_is_masked_and_seed_is_per_prompt(tmp_path):
    folder, _, _ = tiny_folder(tmp_path)
    gen = A.AnchorGenerator.load(folder, device="cpu", text_encoder=TinyText())
    alone = gen.generate(["red circle"])
    batch = gen.generate(["a long prompt with many more words", "red circle"])
    assert np.abs(alone[0].astype(int) - batch[1].astype(int)).max() <= 1  # same anchor in any batch
    again = gen.generate(["red circle"], seed=0)
    other = gen.generate(["red circle"], seed=1)
    assert np.array_equal(alone, again) and not np.array_equal(alone, other)
    assert alone.shape == (1, 8, 8, 3) and alone.dtype == np.uint8


def test_bad_input_is_one_line_error(tmp_path):
    folder, _, _ = tiny_folder(tmp_path)
    gen = A.AnchorGenerator.load(folder, device="cpu", text_encoder=TinyText())
    for bad, msg in (([""], "empty"), ([], "no prompts"), ("text", "list")):
        with pytest.raises(A.AnchorError, match=msg):
            gen.generate(bad)
    with pytest.raises(A.AnchorError, match="steps"):
        gen.generate(["x"], steps=0)
    with pytest.raises(A.AnchorError, match="not found"):
        A.AnchorGenerator.load(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(A.AnchorError, match="not a generator folder"):
        A.AnchorGenerator.load(tmp_path / "junk")


def test_cache_makes_repeats_free(tmp_path):
    folder, _, _ = tiny_folder(tmp_path)
    gen = A.AnchorGenerator.load(folder, device="cpu", cache_dir=tmp_path / "cache", text_encoder=TinyText())
    first = gen.generate(["red circle", "blue square"], steps=2)
    calls = []
    render = gen._render
    gen._render = lambda *a: calls.append(a) or render(*a)
    second = gen.generate(["blue square", "red circle"], steps=2)
    assert calls == [] and np.array_equal(first[::-1], second)
    gen.generate(["blue square"], steps=3)  # another step count is another key
    assert len(calls) == 1
    assert gen.cache.hits == 2
    meta = json.loads((tmp_path / "cache" / P.CACHE_META).read_text())
    assert meta == {"format": P.CACHE_FORMAT, "noise": P.NOISE_SCHEME}


def test_stale_or_foreign_anchor_caches_are_refused(tmp_path):
    """A cache drawn with another noise scheme would serve anchors this engine would not draw."""
    stale = tmp_path / "stale"
    P.AnchorCache(stale)
    (stale / P.CACHE_META).write_text(json.dumps({"format": P.CACHE_FORMAT, "noise": "torch-mt19937"}))
    with pytest.raises(P.AnchorError, match="drawn with noise 'torch-mt19937'.*delete it"):
        P.AnchorCache(stale)
    old = tmp_path / "old"  # a cache of the previous engine: entries but no cache.json
    (old / "ab").mkdir(parents=True)
    np.save(old / "ab" / "abcd.npy", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(P.AnchorError, match="holds files but no cache.json"):
        P.AnchorCache(old)
    (tmp_path / "file").write_text("x")
    with pytest.raises(P.AnchorError, match="is not a folder"):
        P.AnchorCache(tmp_path / "file")
    # A dead writer's temporary cache.json is a leftover, not a foreign file.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (fresh / f".{P.CACHE_META}.tmp-{dead.pid}-x").write_text("{")
    P.AnchorCache(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == [P.CACHE_META]


def test_folder_roundtrip_and_id(tmp_path):
    folder, model, cfg = tiny_folder(tmp_path)
    assert A.generator_kind(folder) == "builtin"
    loaded = A.load_builtin_transformer(folder)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert A.read_builtin_config(folder)[0] == cfg
    assert A.generator_id(folder).startswith("builtin:gen@")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    other, _, _ = tiny_folder(tmp_path, "gen2", seed=1)
    assert A.generator_id(folder).split("@")[1] != A.generator_id(other).split("@")[1]


def test_anchor_store_roundtrip(tmp_path):
    from engine.vision import RegionExtractor, VisionConfig

    folder, _, _ = tiny_folder(tmp_path)
    gen = A.AnchorGenerator.load(folder, device="cpu", text_encoder=TinyText())
    extractor = RegionExtractor.from_config(VisionConfig(image_size=64, weights="random"))
    ids = ["video1#enc#0", "video1#enc#1", "video2#enc#0"]
    prompts = ["red circle", "a red circle", "blue square"]
    out = S.write_anchor_store(tmp_path / "store", gen, extractor, ids, prompts, {"protocol": "query"}, steps=2,
                               batch_size=2, png_dir=tmp_path / "png", progress=False)
    got_ids, regions, meta = S.read_anchor_store(out)
    assert got_ids == ids and regions.shape == (3, 4, 2048)
    assert meta["regions"] == 4 and meta["dim"] == 2048 and meta["steps"] == 2 and meta["protocol"] == "query"
    assert meta["noise"] == P.NOISE_SCHEME
    expect = extractor.regions(gen.generate(prompts[2:], steps=2))
    assert np.allclose(regions[2], expect[0].numpy(), atol=1e-5)
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    with pytest.raises(A.AnchorError, match="anchor store"):
        S.read_anchor_store(tmp_path / "png")
    # A store drawn with another noise scheme is refused with the command that redraws it.
    meta_path = out / S.META_FILE
    from engine.integrity import seal

    meta_path.write_text(json.dumps(seal(dict(meta, noise="torch-mt19937"))))
    with pytest.raises(A.AnchorError, match="drawn with noise 'torch-mt19937'.*cvr anchors"):
        S.read_anchor_store(out)
    meta_path.write_text(json.dumps(dict(meta, noise="torch-mt19937")))  # edited: its digest no longer matches
    with pytest.raises(A.AnchorError, match="edited or damaged.*cvr anchors"):
        S.read_anchor_store(out)


# ---------------------------------------------------------------------------------------------
# Real FLUX.1 layout: a tiny random FluxPipeline saved to disk in the diffusers layout


def tiny_flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    words = ["a", "red", "blue", "circle", "square", "moves", "left", "right"]
    vocab = {w + "</w>": i for i, w in enumerate(words)}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words],
                        extra_ids=0, model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=1,
                                        vocab_size=len(vocab), max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    t5 = T5EncoderModel(T5Config(vocab_size=len(words) + 8, d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), latent_channels=16, norm_num_groups=8,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=(4, 4, 8))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=vae,
                        text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5tok, transformer=tr)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux"
    tiny_flux_pipeline().save_pretrained(folder)
    return folder


def test_real_flux_folder_generates_seeded_batches(flux_dir, tmp_path):
    assert A.generator_kind(flux_dir) == "flux"
    opts = A.GeneratorOptions(size=32, steps=2, max_sequence_length=16)
    gen = A.AnchorGenerator.load(flux_dir, opts, device="cpu", cache_dir=tmp_path / "c")
    assert gen.generator_id.startswith("flux:tiny-flux@") and gen.default_steps == 4
    both = gen.generate(["a red circle", "blue square"])
    assert both.shape == (2, 32, 32, 3) and both.dtype == np.uint8
    gen2 = A.AnchorGenerator.load(flux_dir, opts, device="cpu")
    alone = gen2.generate(["blue square"])
    assert np.abs(alone[0].astype(int) - both[1].astype(int)).max() <= 2  # per-prompt seed, any batch


def test_real_flux_lora_load_and_fuse(flux_dir, tmp_path):
    from diffusers import FluxPipeline

    from training.generator import add_lora, save_lora

    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    add_lora(pipe.transformer, rank=4)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    kwargs = dict(height=32, width=32, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=16,
                  output_type="np")
    with_lora = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    save_lora(tmp_path / "lora", pipe.transformer)
    gen = A.AnchorGenerator.load(flux_dir, A.GeneratorOptions(size=32, steps=2, max_sequence_length=16,
                                                              adapters=[(str(tmp_path / "lora"), 1.0)]), device="cpu")
    fused = gen.backend.pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not any("lora" in n for n, _ in gen.backend.pipe.transformer.named_parameters())  # fused, unloaded
    assert np.abs(with_lora - fused).max() < 1e-4
    assert json.loads((flux_dir / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_real_flux_without_text_encoders(flux_dir):
    gen = A.AnchorGenerator.load(flux_dir, A.GeneratorOptions(size=32, steps=2), device="cpu", text_encoder="skip")
    assert gen.backend.pipe.text_encoder is None and gen.backend.pipe.text_encoder_2 is None
    embeds, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    images = gen.backend(steps=2, seeds=[1, 2], size=32, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    again = gen.backend(steps=2, seeds=[1, 2], size=32, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert images.shape == (2, 32, 32, 3) and np.array_equal(images, again)


def test_anchors_with_worker_processes_write_the_single_process_store(tmp_path, msrvtt):
    """`cvr anchors --workers 2`: shards drawn by two processes, merged into the same store."""
    from engine.cli import main

    torch.manual_seed(0)
    config = A.BuiltinConfig(image_size=8, fold=2, num_layers=1, num_single_layers=1, attention_head_dim=8,
                             num_attention_heads=2, joint_attention_dim=384, pooled_projection_dim=384,
                             axes_dims_rope=(2, 2, 4), default_steps=2)  # MiniLM-conditioned, so workers need no stub
    generator = str(A.save_builtin(tmp_path / "generator", A.build_transformer(config), config))
    common = ["anchors", "--generator", generator, "--root", msrvtt, "--collection", "msrvtt10k", "--split",
              "train,test", "--image-size", "32", "--batch-size", "4", "--limit", "11", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    ids_one, regions_one, meta_one = S.read_anchor_store(tmp_path / "one")
    ids_two, regions_two, meta_two = S.read_anchor_store(tmp_path / "two")
    settings = lambda meta: {k: v for k, v in meta.items() if k not in ("files", "digest")}  # noqa: E731
    assert len(ids_one) == 11 and ids_two == ids_one and settings(meta_two) == settings(meta_one)
    # Same anchors; only float rounding differs, as shards batch the ids differently.
    np.testing.assert_allclose(np.asarray(regions_two), np.asarray(regions_one), atol=1e-4)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["generator", "one", "two"]  # no parts left behind


def test_merging_stores_drawn_with_other_settings_is_refused(tmp_path):
    from engine.datasets import write_bigfile

    for name, steps in (("a", 2), ("b", 4)):
        write_bigfile(tmp_path / name, ["x" + name], np.zeros((1, 8), np.float32))
        meta = {"format": S.STORE_FORMAT, "noise": P.NOISE_SCHEME, "regions": 2, "dim": 4, "steps": steps}
        (tmp_path / name / S.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(A.AnchorError, match="other settings"):
        S.merge_anchor_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_checkpoint_trained_on_anchors_of_another_noise_is_flagged(caplog):
    import logging

    from engine.checkpoint import warn_on_other_noise

    with caplog.at_level(logging.WARNING):
        assert warn_on_other_noise("old-ckpt", {"anchors": {"generator": "builtin:x"}})  # recorded none
    assert "old-ckpt: trained on anchors drawn with noise None" in caplog.text and "cvr anchors" in caplog.text
    assert not warn_on_other_noise("ckpt", {"anchors": {"noise": P.NOISE_SCHEME}})
    assert not warn_on_other_noise("text-only", {"anchors": None})


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance (issue 17)


def test_guidance_one_is_the_sampler_of_before(tmp_path):
    """Guidance 1 (what every folder without guidance_scale reads as) is the plain Euler loop over
    flux_velocity, bit for bit, and writes no guidance_scale into config.json."""
    folder, model, cfg = tiny_folder(tmp_path)
    assert "guidance_scale" not in json.loads((folder / "config.json").read_text())["generator"]
    gen = A.AnchorGenerator.load(folder, device="cpu", text_encoder=TinyText())
    assert gen.backend.guidance_scale == 1.0 and "+cfg" not in gen.generator_id
    prompts = ["a red circle", "blue square moves left now"]
    images = gen.generate(prompts)
    cond = gen.backend.encode_prompt(prompts)
    x = gen.backend.noise([P.prompt_seed(p, 0) for p in prompts])
    ids = A.image_ids(4, 4)
    sigmas = P.flow_sigmas(4).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = x + (s_next - s) * A.flux_velocity(gen.backend.transformer, x, torch.full((2,), s), cond, ids)
    assert np.array_equal(images, P.latents_to_images(P.unpack_latents(x, 4, 4).numpy(), 2))
    assert torch.equal(A.euler_sample(model.eval(), x, cond, 3, ids, 1.0), A.euler_sample(model, x, cond, 3, ids))


def test_cfg_formula_and_null_conditioning(tmp_path):
    _, model, _ = tiny_folder(tmp_path)
    model.eval()
    torch.manual_seed(1)
    cond = A.Conditioning(torch.randn(2, 3, 16), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
                          torch.randn(2, 16))
    x, sigma, ids = torch.randn(2, 4, 48), torch.tensor([0.9, 0.4]), A.image_ids(4, 4)
    with torch.no_grad():
        v_c = A.flux_velocity(model, x, sigma, cond, ids)
        empty = A.Conditioning(torch.zeros(2, 1, 16), torch.zeros(2, 1, dtype=torch.bool), torch.zeros(2, 16))
        v_u = A.flux_velocity(model, x, sigma, empty, ids)
        guided = A.guided_velocity(model, x, sigma, cond, ids, 4.0)
        # The null input carries nothing: its masked length does not matter.
        assert torch.allclose(A.flux_velocity(model, x, sigma, A.null_conditioning(cond), ids), v_u, atol=1e-6)
    assert torch.allclose(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    assert torch.allclose(A.guided_velocity(model, x, sigma, cond, ids, 0.0), v_u, atol=1e-5)


def test_folder_guidance_and_override(tmp_path):
    cfg = A.BuiltinConfig(**{**TINY, "guidance_scale": 3.0})
    torch.manual_seed(0)
    folder = A.save_builtin(tmp_path / "g", A.build_transformer(cfg), cfg, {})
    assert json.loads((folder / "config.json").read_text())["generator"]["guidance_scale"] == 3.0
    assert A.read_builtin_config(folder)[0].guidance_scale == 3.0
    own = A.AnchorGenerator.load(folder, device="cpu", text_encoder=TinyText())
    plain = A.AnchorGenerator.load(folder, A.GeneratorOptions(guidance_scale=1.0), device="cpu",
                                   text_encoder=TinyText())
    assert own.backend.guidance_scale == 3.0 and own.generator_id.endswith("+cfg3")
    # The same weights in a folder without guidance: the id of the unguided sampler, which the
    # guided folder sampled at 1 also has; guided and unguided never share a cache key.
    bare = A.save_builtin(tmp_path / "b" / "g", A.load_builtin_transformer(folder), A.BuiltinConfig(**TINY), {})
    assert A.generator_id(bare) == plain.generator_id == own.generator_id[: -len("+cfg3")]
    assert not np.array_equal(own.generate(["a red circle"]), plain.generate(["a red circle"]))
    with pytest.raises(A.AnchorError, match="guidance_scale"):
        A.BuiltinConfig(**{**TINY, "guidance_scale": -1.0})
    from export.graphs.generator_step import generator_step_spec
    from export.spec import ExportError

    with pytest.raises(ExportError, match="distilled student"):
        generator_step_spec(own.backend.transformer, cfg)


def test_shipped_folders_record_how_they_sample():
    """The shipped student samples without guidance (one transformer pass per step: the latency the
    benchmarks report); the teacher records the guidance it was trained for, and its id says so."""
    from pathlib import Path

    weights = Path(__file__).resolve().parents[1] / "engine" / "weights" / "generator"
    student, _ = A.read_builtin_config(weights / "students" / "4step")
    assert student.guidance_scale == 1.0 and "guidance_scale" not in student.to_dict()
    assert "+cfg" not in A.generator_id(weights / "students" / "4step")
    teacher, info = A.read_builtin_config(weights / "teacher")
    assert teacher.guidance_scale > 1.0 and info["recipe"]["cond_dropout"] > 0  # guidance needs caption dropout
    assert A.generator_id(weights / "teacher").endswith(f"+cfg{teacher.guidance_scale:g}")
