import json

import pytest
import torch

import spectra
from spectra.checkpoint import save_model
from spectra.interop.hf import export_hf, load_hf, ternary_from_unpacked
from spectra.layers import TernaryLinear
from spectra.model import build_model
from spectra.ternary import SHARD_DIM, ternarize
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}, "Ġ": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("family,shards", [("floatlm", 1), ("trilm", 1), ("trilm", 2)])
def test_logits_match_transformers(tmp_path, family, shards):
    torch.manual_seed(0)
    model = build_model(tiny_config(family=family, num_scale_shards=shards), seed=1).eval()
    out = export_hf(model, tmp_path / "hf", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config.get("pretraining_model_parallel") == (shards if family == "trilm" else None)


def _unpacked_trilm_from_transformers(tmp_path, mp: int):
    """An unpacked TriLM made with transformers itself: block matrices replaced by per-shard γ·Ŵ."""
    torch.manual_seed(mp)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    expected = {}
    with torch.no_grad():
        for name, module in hf.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in SHARD_DIM:
                codes, scales = ternarize(module.weight * 3.0, mp, SHARD_DIM[leaf])
                scales = scales * torch.arange(1, mp + 1)  # make the shards' scales clearly different
                module.weight.copy_(spectra.ternary.dequantize(codes, scales, SHARD_DIM[leaf]))
                expected[name.removeprefix("model.")] = (codes, scales)
    hf.config.pretraining_model_parallel = mp
    hf.save_pretrained(tmp_path / f"trilm_mp{mp}")
    return hf, expected, tmp_path / f"trilm_mp{mp}"


@pytest.mark.parametrize("mp", [1, 2])
def test_recovers_codes_and_scales_from_unpacked_trilm(tmp_path, mp):
    hf, expected, path = _unpacked_trilm_from_transformers(tmp_path, mp)
    model = spectra.load(path)
    assert model.config.family == "trilm" and model.config.num_scale_shards == mp
    for name, (codes, scales) in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, TernaryLinear)
        got_codes, got_scales = layer.codes_and_scales()
        assert torch.equal(got_codes, codes), name
        assert torch.equal(got_scales, scales), name
    idx = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_recorded_mp_is_only_a_hint(tmp_path):
    # a checkpoint whose scales are per-matrix although config says MP=2 still loads (MP=2 splits are consistent)
    hf, expected, path = _unpacked_trilm_from_transformers(tmp_path, 1)
    config = json.loads((path / "config.json").read_text())
    config["pretraining_model_parallel"] = 2
    (path / "config.json").write_text(json.dumps(config))
    model = spectra.load(path)
    assert model.config.family == "trilm"


def test_floatlm_from_hf_stays_float(tmp_path):
    model = build_model(tiny_config(), seed=0)
    export_hf(model, tmp_path / "f", dtype=torch.float32)
    loaded = spectra.load(tmp_path / "f")
    assert loaded.config.family == "floatlm"
    for (n, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_claimed_ternary_that_is_not(tmp_path):
    export_hf(build_model(tiny_config(), seed=0), tmp_path / "f", dtype=torch.float32)
    with pytest.raises(ValueError, match="q_proj.weight is not ternary"):
        load_hf(tmp_path / "f", family="trilm")
    with pytest.raises(ValueError, match="not ternary: a shard"):
        ternary_from_unpacked(torch.tensor([[0.5, -0.5, 0.25]]), 1, 0)


def test_export_and_reload_trilm_fp16_then_train_further(tmp_path):
    model = build_model(tiny_config(family="trilm"), seed=0)
    export_hf(model, tmp_path / "t")  # fp16 like the released checkpoints
    loaded = spectra.load(tmp_path / "t")
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            c0, _ = module.codes_and_scales()
            c1, s1 = loaded.get_submodule(name).codes_and_scales()
            assert torch.equal(c0, c1)
            # recomputing the formula from the recovered latent weight gives the same codes
            c2, s2 = ternarize(loaded.get_submodule(name).weight)
            assert torch.equal(c2, c1) and torch.allclose(s2, s1, rtol=1e-5)


def test_tokenizer_files_load_with_autotokenizer(tmp_path):
    tok = _tokenizer(tmp_path)
    model = build_model(tiny_config(), seed=0)
    save_model(model, tmp_path / "ours", tokenizer=tok)
    out = export_hf(model, tmp_path / "hf", tokenizer=tmp_path / "ours" / "tokenizer.json")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.eos_token_id == 0 and auto("a b c")["input_ids"] == [1, 2, 3]


@pytest.mark.parametrize("kw,match", [(dict(norm="layernorm"), "norm='layernorm' cannot be exported"),
                                      (dict(mlp_act="gelu"), "mlp_act='gelu' cannot be exported")])
def test_export_refuses_what_llama_cannot_represent(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        export_hf(build_model(tiny_config(**kw)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_hf_directories(tmp_path):
    export_hf(build_model(tiny_config()), tmp_path / "ok", dtype=torch.float32)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="model_type='gpt2'.*accepted: a Llama checkpoint"):
        spectra.load(bad)

    gqa = tmp_path / "gqa"
    gqa.mkdir()
    (gqa / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        spectra.load(gqa)

    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64)
    shaped = tmp_path / "shape"
    shaped.mkdir()
    (shaped / "config.json").write_text(json.dumps(config))
    save_file(state, str(shaped / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj.weight has shape \(64, 64\).*\(128, 64\)"):
        spectra.load(shaped)

    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(shaped / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        spectra.load(shaped)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a spectra model directory"):
        spectra.load(empty)


def test_rope_theta_from_rope_parameters(tmp_path):
    """transformers 5 writes rope_theta inside `rope_parameters`; the import read only the top-level field and so
    loaded any model saved by it with θ = 10000 (a review, 2026-12-07: logits off by 15), and took a scaled RoPE
    without a word."""
    transformers = pytest.importorskip("transformers")
    from spectra.config import ModelConfig
    from spectra.interop.hf import config_from_hf
    from spectra.loading import load

    m = build_model(ModelConfig(dim=64, glu_dim=96, n_heads=4, n_layers=2, vocab_size=320, max_seq_len=128,
                                rope_theta=500000.0, init_std=0.3), seed=1).eval()
    export_hf(m, tmp_path / "a", dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "b")
    again = load(tmp_path / "b")
    ids = torch.randint(0, 320, (1, 100))
    with torch.no_grad():
        assert again.config.rope_theta == 500000.0 and torch.equal(again(ids), m(ids))
    base = json.loads((tmp_path / "a" / "config.json").read_text())
    moved = {**{k: v for k, v in base.items() if k != "rope_theta"},
             "rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}}
    assert config_from_hf(moved, "c.json").rope_theta == 250000.0
    with pytest.raises(ValueError, match=r"c.json: rope_parameters.rope_type='linear' \(a scaled RoPE\)"):
        config_from_hf({**moved, "rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 4.0}},
                       "c.json")


def test_export_of_a_quantlm_or_packed_trilm_writes_the_matrices_they_multiply_by(tmp_path):
    """`export hf` on a QuantLM wrote its GPTQ buffers (qweight, qzeros, scales, g_idx) cast to float under names no
    Llama model has, and on a packed TriLM its codes and int8 head: transformers then initialised every block matrix
    at random, and the command said "wrote" (a review, 2026-12-07). Each layer is now written as its dense matrix."""
    transformers = pytest.importorskip("transformers")
    from spectra.config import ModelConfig
    from spectra.interop.weights import dense_weight
    from spectra.loading import load
    from spectra.packed.io import pack_model
    from spectra.ptq.pipeline import quantize

    ids = torch.randint(0, 28, (2, 40))
    cfg = ModelConfig(dim=64, glu_dim=128, n_heads=4, n_layers=2, vocab_size=320, max_seq_len=64)
    src = save_model(build_model(cfg, seed=0), tmp_path / "float", tokenizer=_tokenizer(tmp_path))
    quantize(src, tmp_path / "q4", bits=4, calib="builtin", n_samples=8, seq_len=64, group_size=32, format="gptq",
             progress=False)
    q = load(tmp_path / "q4")
    export_hf(q, tmp_path / "q4_hf", dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q4_hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, q(ids))

    tri = build_model(ModelConfig(family="trilm", dim=256, glu_dim=512, n_heads=4, n_layers=2, vocab_size=320,
                                  max_seq_len=64), seed=0)
    pack_model(load(save_model(tri, tmp_path / "tri")), tmp_path / "packed", format="tq2")
    p = load(tmp_path / "packed")
    export_hf(p, tmp_path / "p_hf", dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "p_hf", dtype=torch.float32)
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, dense_weight(p.layers[1].mlp.down_proj))
    assert torch.equal(hf.lm_head.weight, dense_weight(p.lm_head))
    assert load(tmp_path / "p_hf").config.family == "trilm"


def _folder(tmp_path, name, config, state):
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file(state, str(d / "model.safetensors"))
    return d


def test_left_out_fields_and_old_checkpoints_load_as_transformers_builds_them(tmp_path):
    """Fields a config.json leaves out take LlamaConfig's defaults (spectra took rms_norm_eps 1e-5 and bos/eos 0: logits
    6.06 apart); num_key_value_heads null means as many as the heads; older checkpoints' rotary_emb.inv_freq caches are
    dropped (they were 'unexpected tensors')."""
    from safetensors.torch import load_file

    export_hf(build_model(tiny_config(), seed=2), tmp_path / "ok", dtype=torch.float32)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    for k in ("rms_norm_eps", "bos_token_id", "eos_token_id"):
        del config[k]
    config["num_key_value_heads"] = None
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    d = _folder(tmp_path, "old", config, state)
    ours = spectra.load(d)
    assert (ours.config.norm_eps, ours.config.bos_token_id, ours.config.eos_token_id) == (1e-6, 1, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    idx = torch.randint(0, 256, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_malformed_model_parallel_and_index_are_one_line(tmp_path, capsys):
    from safetensors.torch import load_file

    from spectra.__main__ import main

    export_hf(build_model(tiny_config(family="trilm"), seed=2), tmp_path / "ok", dtype=torch.float32)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    for i, bad in enumerate(("2", 2.0, -1, True)):
        d = _folder(tmp_path, f"mp{i}", {**config, "pretraining_model_parallel": bad}, state)
        assert main(["info", str(d)]) == 2
        assert f"field 'pretraining_model_parallel' must be a positive integer (the TriLM's model-parallel scale " \
               f"shards) or null, got {bad!r}" in capsys.readouterr().err
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(config))
    index = sharded / "model.safetensors.index.json"
    for doc, said in (([], "has no 'weight_map' object"), ({"weight_map": {"a": 5}}, "weight_map values must be file "
                                                                                     "names"),
                      ({"weight_map": {"a": "../x.safetensors"}}, "weight_map values must be file names"),
                      ({"weight_map": {"a": "model-2.safetensors"}}, "names 1 missing file(s): ")):
        index.write_text(json.dumps(doc))
        (sharded / "model-1.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
        for cmd in (["info", str(sharded)], ["export", "hf", str(sharded), str(tmp_path / "out")]):
            assert main(cmd) == 2, (doc, cmd)
            err = capsys.readouterr().err
            assert said in err and len(err.strip().splitlines()) == 1, err


def test_info_finds_a_trilm_as_load_does(tmp_path, capsys):
    """`spectra info` called every Hugging Face TriLM a FloatLM (it never looked at the weights)."""
    from spectra.__main__ import main

    export_hf(build_model(tiny_config(family="trilm", num_scale_shards=2), seed=2), tmp_path / "t", dtype=torch.float16)
    assert main(["info", str(tmp_path / "t"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "trilm" and report["kind"] == "hf"
    assert spectra.load(tmp_path / "t").config.num_scale_shards == 2


def test_export_keeps_the_chat_template(tmp_path):
    """export hf of a Hugging Face folder wrote a fresh tokenizer_config.json without the source's chat_template,
    which `spectra serve` reads; chat_template.jinja (transformers >= 4.50) is copied and read by serve too."""
    from spectra.serve.app import load_chat_template

    src = tmp_path / "src"
    export_hf(build_model(tiny_config(), seed=2), src, dtype=torch.float32, tokenizer=_tokenizer(tmp_path))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    out = export_hf(spectra.load(src), tmp_path / "out", tokenizer=src / "tokenizer.json")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert load_chat_template(str(out)).source == template
    (src / "chat_template.jinja").write_text("{{ 'jinja file' }}")
    out2 = export_hf(spectra.load(src), tmp_path / "out2", tokenizer=src / "tokenizer.json")
    assert load_chat_template(str(out2)).source == "{{ 'jinja file' }}"
