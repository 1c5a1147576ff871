"""Text backbones: the native MDLM DDiT against an independent reference, padding, hub layout, HF adapter."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sklearn_difffeat.backbones.hf_masked_lm import HFMaskedLMBackbone
from sklearn_difffeat.backbones.mdlm import DDiTConfig, DDiTModel, MDLMBackbone, loglinear_sigma
from sklearn_difffeat.backbones.text import load_text_backbone

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "rug",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "house",
    "tree",
    "bird",
    "fish",
    "sky",
    "sea",
    "sun",
    "moon",
    "star",
    "car",
    "road",
    "hill",
]


def make_tokenizer():
    """A whitespace WordLevel tokenizer over WORDS with [PAD]=0, [MASK]=1, [UNK]=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[MASK]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")


def make_tiny_mdlm(folder, time_conditioning=False, seed=0, n_blocks=3, model_length=64):
    """A random DDiT (vocab 50, width 32, 4 heads, cond 16) saved in the hub layout with a tiny tokenizer.

    Every weight, adaLN included, is random and non-zero so that the modulation and gates matter.
    """
    torch.manual_seed(seed)
    cfg = DDiTConfig(
        vocab_size=50,
        model_length=model_length,
        hidden_dim=32,
        cond_dim=16,
        n_blocks=n_blocks,
        n_heads=4,
        dropout=0.1,
        time_conditioning=time_conditioning,
    )
    model = DDiTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2 and "embedding" not in name:  # O(1) activations: scale by fan-in
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# ---- an independent reference: the DDiT equations written out, reading the hub-named weights ---------------
def reference_blocks(folder, ids, sigma, attention_mask=None):
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    D, H = cfg["hidden_dim"], cfg["n_heads"]
    d = D // H
    B, L = ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, L)

    def linear(x, name, bias=True):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    def layernorm(x, weight):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * weight

    def silu(x):
        return x / (1 + torch.exp(-x))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(B)
    if not cfg["time_conditioning"]:
        sigma = torch.zeros_like(sigma)
    k = torch.arange(128, dtype=torch.float64)
    args = sigma[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = linear(silu(linear(temb, "backbone.sigma_map.mlp.0")), "backbone.sigma_map.mlp.2")
    c = silu(c)

    # rotary: rotate the pair (dim j, dim j + d/2) of every head by angle pos * 10000^(-2j/d)
    theta = torch.arange(L, dtype=torch.float64)[:, None] * 10000.0 ** (-2 * torch.arange(d // 2) / d)[None]
    cos, sin = torch.cos(theta), torch.sin(theta)  # (L, d/2)

    def rope(x):  # (B, H, L, d)
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    x = w["backbone.vocab_embed.embedding"][ids]
    outs = [x]
    for i in range(cfg["n_blocks"]):
        p = f"backbone.blocks.{i}"
        mod = linear(c, p + ".adaLN_modulation")[:, None, :]
        sh1, sc1, g1, sh2, sc2, g2 = (mod[..., j * D : (j + 1) * D] for j in range(6))
        h = layernorm(x, w[p + ".norm1.weight"]) * (1 + sc1) + sh1
        qkv = linear(h, p + ".attn_qkv", bias=False).reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4)
        q, kk, v = rope(qkv[0]), rope(qkv[1]), qkv[2]
        scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        attn = (probs @ v).permute(0, 2, 1, 3).reshape(B, L, D)
        x = x + g1 * linear(attn, p + ".attn_out", bias=False)
        h = layernorm(x, w[p + ".norm2.weight"]) * (1 + sc2) + sh2
        x = x + g2 * linear(gelu_tanh(linear(h, p + ".mlp.0")), p + ".mlp.2")
        outs.append(x)
    return outs


@pytest.fixture(scope="module")
def mdlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdlm")
    return {tc: make_tiny_mdlm(root / f"tc{int(tc)}", time_conditioning=tc) for tc in (False, True)}


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_native_blocks_match_independent_reference(mdlm_dirs, time_conditioning):
    folder = mdlm_dirs[time_conditioning]
    backbone = load_text_backbone(str(folder))
    assert isinstance(backbone, MDLMBackbone)
    assert backbone.time_conditioned is time_conditioning
    assert (backbone.num_blocks, backbone.width, backbone.max_length) == (3, 32, 64)
    ids = torch.randint(3, 50, (2, 7))
    sigma = loglinear_sigma(torch.tensor([0.3, 0.8]))
    expected = reference_blocks(folder, ids, sigma)
    got = backbone.hidden_states(ids, torch.ones_like(ids), sigma, blocks=[0, 1, 2, 3])
    assert sorted(got) == [0, 1, 2, 3]
    for k in range(4):
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), expected[k], atol=1e-5, rtol=1e-5)
    # sigma matters exactly when the model is time-conditioned
    other = backbone.hidden_states(ids, None, torch.zeros(2), blocks=[3])[3]
    assert torch.allclose(other, got[3]) is (not time_conditioning)


def test_native_padding_mask_matches_reference(mdlm_dirs):
    folder = mdlm_dirs[True]
    backbone = load_text_backbone(folder)
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    expected = reference_blocks(folder, ids, torch.tensor([0.5, 1.0]), mask)
    got = backbone.hidden_states(ids, mask, torch.tensor([0.5, 1.0]), blocks=[2, 3])
    for k in (2, 3):
        real = mask.bool()
        torch.testing.assert_close(got[k][real].double(), expected[k][real], atol=1e-5, rtol=1e-5)


def test_truncation_runs_no_deeper_block(mdlm_dirs):
    backbone = load_text_backbone(mdlm_dirs[False])
    calls = []
    handles = [
        blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, blk in enumerate(backbone.module.blocks)
    ]
    try:
        out = backbone.hidden_states(torch.randint(3, 50, (1, 5)), None, None, blocks=[-3, 1])
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == [1] and calls == [0]
    with pytest.raises(ValueError, match="out of range"):
        backbone.hidden_states(torch.randint(3, 50, (1, 5)), None, None, blocks=[4])


def test_padding_does_not_change_real_positions(mdlm_dirs):
    backbone = load_text_backbone(mdlm_dirs[True])
    text = torch.tensor([5, 9, 12, 7])
    results = []
    for total in (4, 6, 11):
        ids = torch.full((2, total), backbone.pad_token_id)
        mask = torch.zeros(2, total, dtype=torch.long)
        ids[0, :4], mask[0, :4] = text, 1
        ids[1, :], mask[1, :] = torch.randint(3, 50, (total,)), 1  # a longer neighbour sets the padding
        out = backbone.hidden_states(ids, mask, torch.tensor([0.7, 0.2]), blocks=[0, 1, 2, 3])
        results.append({k: v[0, :4] for k, v in out.items()})
    for other in results[1:]:
        for k in range(4):
            torch.testing.assert_close(other[k], results[0][k], atol=1e-6, rtol=1e-6)


def test_save_load_round_trip_uses_hub_names(mdlm_dirs, tmp_path):
    folder = mdlm_dirs[True]
    model = DDiTModel.from_pretrained(folder)
    names = set(load_file(str(folder / "model.safetensors")))
    expected = {
        "backbone.vocab_embed.embedding",
        "backbone.rotary_emb.inv_freq",
        "backbone.output_layer.norm_final.weight",
    }
    expected |= {f"backbone.sigma_map.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expected |= {f"backbone.output_layer.{m}.{p}" for m in ("linear", "adaLN_modulation") for p in ("weight", "bias")}
    for b in range(3):
        expected |= {f"backbone.blocks.{b}.{n}.weight" for n in ("norm1", "norm2", "attn_qkv", "attn_out")}
        expected |= {
            f"backbone.blocks.{b}.{m}.{p}" for m in ("mlp.0", "mlp.2", "adaLN_modulation") for p in ("weight", "bias")
        }
    assert names == expected
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "mdlm" and cfg["architectures"] == ["MDLM"]
    assert {
        "vocab_size",
        "model_length",
        "hidden_dim",
        "cond_dim",
        "n_blocks",
        "n_heads",
        "dropout",
        "time_conditioning",
    } <= set(cfg)

    model.save_pretrained(tmp_path / "again")
    again = DDiTModel.from_pretrained(tmp_path / "again")
    ids = torch.randint(0, 50, (3, 9))
    sigma = torch.tensor([0.1, 1.0, 3.0])
    assert torch.equal(model(ids, sigma), again(ids, sigma))
    assert model(ids, sigma).shape == (3, 9, 50)
    # the full forward's last hidden state is the truncated pass's last block
    backbone = MDLMBackbone(again, make_tokenizer())
    assert backbone.mask_token_id == 1 and backbone.pad_token_id == 0


def test_config_keeps_unknown_fields_and_drops_auto_map(tmp_path):
    cfg = DDiTConfig.from_dict(
        {
            "model_type": "mdlm",
            "n_blocks": 2,
            "hidden_dim": 16,
            "n_heads": 2,
            "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig"},
            "return_dict": False,
        }
    )
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["return_dict"] is False and "auto_map" not in data and data["n_blocks"] == 2


# ---- the generic Hugging Face adapter ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("bert")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_hf_adapter_matches_output_hidden_states(bert_dir):
    backbone = load_text_backbone(str(bert_dir))
    assert isinstance(backbone, HFMaskedLMBackbone)
    assert (backbone.num_blocks, backbone.width, backbone.max_length) == (3, 32, 64)
    assert (backbone.mask_token_id, backbone.pad_token_id, backbone.time_conditioned) == (1, 0, False)
    ids = torch.randint(3, 40, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    reference = backbone.module(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(reference) == 4
    for k in range(4):  # one block at a time (truncated for k < 3, full forward for k = 3) ...
        torch.testing.assert_close(backbone.hidden_states(ids, mask, None, [k])[k], reference[k], atol=0, rtol=0)
    together = backbone.hidden_states(ids, mask, None, [2, 0, -1])  # ... and several in one pass
    assert sorted(together) == [0, 2, 3]
    for k in (0, 2, 3):
        torch.testing.assert_close(together[k], reference[k], atol=0, rtol=0)


def test_hf_adapter_truncates(bert_dir):
    backbone = load_text_backbone(bert_dir)
    layers = backbone.module.base_model.encoder.layer
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        backbone.hidden_states(torch.randint(3, 40, (1, 6)), None, None, [1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]


def test_hf_adapter_refuses_remote_code(bert_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(bert_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForMaskedLM": "modeling_evil.EvilForMaskedLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"auto_map.*trust_remote_code=True"):
        load_text_backbone(str(folder))
    # With consent the flag reaches transformers, which then looks for the (absent) module file: no code runs.
    with pytest.raises(OSError, match="modeling_evil"):
        load_text_backbone(str(folder), trust_remote_code=True)


def test_loader_passes_backbones_through_and_rejects_junk(mdlm_dirs):
    backbone = load_text_backbone(mdlm_dirs[False])
    assert load_text_backbone(backbone) is backbone
    with pytest.raises(TypeError):
        load_text_backbone(3)
    with pytest.raises(ValueError, match="does not exist"):
        load_text_backbone("/nonexistent/folder/x")
