"""Tests for lit_accel.models.structure on tiny random HF models and a hand-written transformer."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.pytorch_utils import Conv1D

from lit_accel.models.structure import (
    AttentionShape,
    ModelStructure,
    StructurePatterns,
    get_structure,
    is_linear,
    linear_in_out_features,
)

SMALL: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
)


def llama(**kw: Any) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_key_value_heads": 2, **kw}))


def mistral() -> MistralForCausalLM:
    return MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2))


def qwen2() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2))


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)


def gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(gpt2_config())


# A small hand-written pre-norm transformer, as a user might write one.
class Attn(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attn(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, n: int, dim: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(n))


class Custom(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = Encoder(n, dim, heads)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(x)


CUSTOM_PATTERNS = StructurePatterns(
    blocks=r"encoder\.layers\.\d+",
    attention="attn",
    mlp="ff",
    attention_norm="norm1",
    mlp_norm="norm2",
    attention_roles={"q": "q", "k": "k", "v": "v", "o": "out"},
    mlp_roles={"up": "0", "down": "2"},
    embedding="embed",
    lm_head="head",
    num_heads=4,
)

HF_FACTORIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "gpt2": gpt2,
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    out: dict[str, nn.Module] = {k: f().eval() for k, f in HF_FACTORIES.items()}
    out["custom"] = Custom().eval()
    return out


def structure_of(models: dict[str, nn.Module], arch: str) -> ModelStructure:
    return get_structure(models[arch], CUSTOM_PATTERNS if arch == "custom" else None)


ALL = [*HF_FACTORIES, "custom"]


@pytest.mark.parametrize("arch", ALL)
def test_blocks_sublayers_and_names(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    s = structure_of(models, arch)
    names = dict(model.named_modules())
    assert s.arch == arch
    assert s.num_layers == (3 if arch == "custom" else 2)
    assert [b.index for b in s.blocks] == list(range(s.num_layers))
    subs = s.sublayers()
    assert [x.kind for x in subs] == ["attention", "mlp"] * s.num_layers
    assert [x.block_index for x in subs] == [i for i in range(s.num_layers) for _ in range(2)]
    for block in s.blocks:
        assert names[block.name] is block.module
        for sub in (block.attention, block.mlp):
            assert names[sub.name] is sub.module
            assert sub.name.startswith(block.name + ".")
            assert sub.norm_name is not None and names[sub.norm_name] is sub.norm
            for role, qual in sub.roles.items():
                assert qual in sub.linears, role
                assert sub.linear(role) is names[qual]
    for name in (s.embedding_name, s.lm_head_name):
        assert name in names


@pytest.mark.parametrize("arch", ALL)
def test_linears_are_exactly_the_block_linears(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    s = structure_of(models, arch)
    block_names = tuple(b.name + "." for b in s.blocks)
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n.startswith(block_names)}
    assert set(s.linears()) == expected
    assert list(s.linears(include_lm_head=True))[-1] == s.lm_head_name
    assert len(s.linears(include_lm_head=True)) == len(expected) + 1


def test_role_names() -> None:
    s = get_structure(llama())
    assert s.blocks[1].attention.roles == {r: f"model.layers.1.self_attn.{r}_proj" for r in ("q", "k", "v", "o")}
    assert s.blocks[1].mlp.roles == {r: f"model.layers.1.mlp.{r}_proj" for r in ("gate", "up", "down")}
    assert s.blocks[0].attention.norm_name == "model.layers.0.input_layernorm"
    assert s.blocks[0].mlp.norm_name == "model.layers.0.post_attention_layernorm"
    assert (s.embedding_name, s.lm_head_name, s.final_norm_name) == ("model.embed_tokens", "lm_head", "model.norm")
    g = get_structure(gpt2())
    assert g.blocks[0].attention.roles == {"qkv": "transformer.h.0.attn.c_attn", "o": "transformer.h.0.attn.c_proj"}
    assert g.blocks[0].mlp.roles == {"up": "transformer.h.0.mlp.c_fc", "down": "transformer.h.0.mlp.c_proj"}
    assert g.position_embedding_name == "transformer.wpe"
    with pytest.raises(KeyError, match=r"has no role 'gate'.*\['down', 'up'\]"):
        g.blocks[0].mlp.linear("gate")


@pytest.mark.parametrize("factory", [LlamaModel, Qwen2Model])
def test_base_models(factory: type[PreTrainedModel]) -> None:
    cfg = (LlamaConfig if factory is LlamaModel else Qwen2Config)(**SMALL, num_key_value_heads=2)
    s = get_structure(factory(cfg))
    assert s.blocks[0].attention.name == "layers.0.self_attn"
    assert (s.embedding_name, s.lm_head_name, s.final_norm_name) == ("embed_tokens", None, "norm")
    g = get_structure(GPT2Model(gpt2_config()))
    assert g.blocks[1].mlp.name == "h.1.mlp" and g.lm_head_name is None


def test_shapes_from_config(models: dict[str, nn.Module]) -> None:
    for arch in ("llama", "mistral", "qwen2"):
        s = structure_of(models, arch)
        assert s.attention == AttentionShape(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
        assert (s.hidden_size, s.intermediate_size, s.vocab_size) == (64, 128, 128)
        k_in, k_out = linear_in_out_features(s.blocks[0].attention.linear("k"))
        assert (k_in, k_out) == (64, s.attention.num_kv_heads * s.attention.head_dim)
    g = structure_of(models, "gpt2")
    assert g.attention == AttentionShape(num_heads=4, num_kv_heads=4, head_dim=16, hidden_size=64)
    assert (g.intermediate_size, g.max_position_embeddings, g.vocab_size) == (256, 64, 128)
    # num_key_value_heads None falls back to num_attention_heads; an explicit head_dim wins over hidden // heads.
    model = llama(head_dim=8, num_key_value_heads=4)
    model.config.num_key_value_heads = None
    s = get_structure(model)
    assert s.attention.head_dim == 8 and s.attention.num_kv_heads == 4
    del model.config.head_dim
    assert get_structure(model).attention.head_dim == 16


def test_attention_shape_groups() -> None:
    a = AttentionShape(num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=128)
    assert a.kv_group_size == 4
    assert [a.kv_group(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(a.kv_group(h) == g for g in range(2) for h in a.query_heads(g))
    with pytest.raises(ValueError, match="query_head"):
        a.kv_group(8)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads=3"):
        AttentionShape(num_heads=8, num_kv_heads=3, head_dim=16, hidden_size=128)


def test_conv1d_in_out_features(models: dict[str, nn.Module]) -> None:
    g = structure_of(models, "gpt2")
    qkv = g.blocks[0].attention.linear("qkv")
    assert isinstance(qkv, Conv1D) and tuple(qkv.weight.shape) == (64, 192)
    assert linear_in_out_features(qkv) == (64, 192)
    assert linear_in_out_features(g.blocks[0].mlp.linear("up")) == (64, 256)
    assert linear_in_out_features(g.blocks[0].mlp.linear("down")) == (256, 64)
    assert linear_in_out_features(nn.Linear(3, 5)) == (3, 5)
    with pytest.raises(TypeError, match="LayerNorm is not a linear layer"):
        linear_in_out_features(nn.LayerNorm(4))


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


@pytest.mark.parametrize("arch", ALL)
def test_residual_boundary_by_hooks(models: dict[str, nn.Module], arch: str) -> None:
    """In a real forward pass: block_out == x + attn(norm1(x)) + mlp(norm2(x + attn(...)))."""
    model = models[arch]
    s = structure_of(models, arch)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook(key: str) -> Any:
        def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            inp = args[0] if args else kwargs["hidden_states"]
            seen[key] = (inp.detach(), _first(out).detach())

        return fn

    for b in s.blocks:
        for key, mod in [
            ("block", b.module),
            ("attn", b.attention.module),
            ("norm1", b.attention.norm),
            ("mlp", b.mlp.module),
            ("norm2", b.mlp.norm),
        ]:
            assert mod is not None
            handles.append(mod.register_forward_hook(hook(f"{b.index}.{key}"), with_kwargs=True))
    try:
        with torch.no_grad():
            model(torch.randint(0, 50, (2, 7)))
    finally:
        for h in handles:
            h.remove()
    for i in range(s.num_layers):
        x, out = seen[f"{i}.block"]
        n1_in, n1_out = seen[f"{i}.norm1"]
        a_in, a_out = seen[f"{i}.attn"]
        n2_in, n2_out = seen[f"{i}.norm2"]
        m_in, m_out = seen[f"{i}.mlp"]
        torch.testing.assert_close(n1_in, x)
        torch.testing.assert_close(a_in, n1_out)
        torch.testing.assert_close(n2_in, x + a_out)
        torch.testing.assert_close(m_in, n2_out)
        torch.testing.assert_close(out, x + a_out + m_out)


def test_residual_boundary_recomputed_llama_and_gpt2(models: dict[str, nn.Module]) -> None:
    x = torch.randn(2, 5, 64)
    s = structure_of(models, "llama")
    model = models["llama"]
    pos = torch.arange(5)[None]
    pe = model.get_submodule("model.rotary_emb")(x, position_ids=pos)
    for b in s.blocks:
        assert b.attention.norm is not None and b.mlp.norm is not None
        with torch.no_grad():
            ref = b.module(x, position_embeddings=pe, position_ids=pos)
            h = x + b.attention.module(b.attention.norm(x), position_embeddings=pe, attention_mask=None)[0]
            out = h + b.mlp.module(b.mlp.norm(h))
        torch.testing.assert_close(_first(ref), out)
    g = structure_of(models, "gpt2")
    for b in g.blocks:
        assert b.attention.norm is not None and b.mlp.norm is not None
        with torch.no_grad():
            ref = b.module(x)
            h = x + b.attention.module(b.attention.norm(x))[0]
            out = h + b.mlp.module(b.mlp.norm(h))
        torch.testing.assert_close(_first(ref), out)


def test_num_parameters() -> None:
    model = llama()
    s = get_structure(model)
    total = sum(p.numel() for p in model.parameters())
    assert s.num_parameters() == total
    emb = model.model.embed_tokens.weight.numel()
    head = model.lm_head.weight.numel()
    assert s.num_parameters(include_embeddings=False) == total - emb
    assert s.num_parameters(include_embeddings=False, include_lm_head=False) == total - emb - head
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert s.num_parameters(linears_only=True, include_lm_head=False) == 2 * per_layer
    assert s.num_parameters(linears_only=True) == 2 * per_layer + head
    # GPT-2 ties the head to the embedding: counted once, and kept when either flag asks for it.
    g = get_structure(gpt2())
    assert g.tied_embeddings and not s.tied_embeddings
    gtotal = sum(p.numel() for p in g.model.parameters())
    wte, wpe = (g.model.get_parameter(f"transformer.{n}.weight").numel() for n in ("wte", "wpe"))
    assert g.num_parameters() == gtotal
    assert g.num_parameters(include_embeddings=False) == gtotal - wpe
    assert g.num_parameters(include_embeddings=False, include_lm_head=False) == gtotal - wpe - wte


def test_custom_patterns_shapes(models: dict[str, nn.Module]) -> None:
    s = structure_of(models, "custom")
    assert s.attention == AttentionShape(num_heads=4, num_kv_heads=4, head_dim=8, hidden_size=32)
    assert (s.intermediate_size, s.vocab_size, s.max_position_embeddings) == (96, 50, None)
    assert s.blocks[2].mlp.roles == {"up": "encoder.layers.2.ff.0", "down": "encoder.layers.2.ff.2"}
    # Minimal patterns: no norms, roles or embedding; sizes inferred from the linears.
    m = StructurePatterns(blocks=r"encoder\.layers\.\d+", attention="attn", mlp="ff", num_heads=2)
    s2 = get_structure(models["custom"], m)
    assert s2.blocks[0].attention.norm is None and s2.blocks[0].attention.roles == {}
    assert (s2.hidden_size, s2.intermediate_size, s2.vocab_size, s2.attention.head_dim) == (32, 96, 0, 16)
    assert s2.lm_head_name is None and len(s2.linears(include_lm_head=True)) == 3 * 6


def test_patterns_on_supported_hf_model_override() -> None:
    p = StructurePatterns(
        blocks=r"model\.layers\.\d+", attention="self_attn", mlp="mlp", arch="my-llama", hidden_size=64
    )
    s = get_structure(llama(), p)
    assert s.arch == "my-llama" and s.attention.num_kv_heads == 2  # the rest from model.config


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_peft_wrapped_model() -> None:
    peft = pytest.importorskip("peft")
    base = qwen2()
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    s = get_structure(wrapped)
    prefix = "base_model.model.model.layers.0.self_attn."
    assert s.blocks[0].attention.roles["q"] == prefix + "q_proj"
    lin = s.blocks[0].attention.linears
    assert set(lin) == {prefix + n for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert is_linear(lin[prefix + "q_proj"]) and not isinstance(lin[prefix + "q_proj"], nn.Linear)
    assert linear_in_out_features(lin[prefix + "q_proj"]) == (64, 64)
    assert s.lm_head_name == "base_model.model.lm_head"


def test_unsupported_arch_error() -> None:
    with pytest.raises(ValueError, match=r"does not know Custom \(no Hugging Face config\)") as err:
        get_structure(Custom())
    msg = str(err.value)
    assert "llama, mistral, qwen2, qwen3, gemma, gemma2" in msg and "StructurePatterns(blocks=" in msg

    class FakeConfig:
        model_type = "bert"

    m = Custom()
    m.config = FakeConfig()  # type: ignore[assignment]
    with pytest.raises(ValueError, match=re.escape("config.model_type='bert'")):
        get_structure(m)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"blocks": r"decoder\.h\.\d+"},
            r"blocks='decoder.*matches no module name.*'encoder\.layers\.0\.\.2'.*'embed', 'encoder', 'head'",
        ),
        ({"blocks": r"encoder\.layers\.(\d+"}, r"blocks=.*not a valid regex"),
        ({"blocks": r"encoder\.layers\.\d+.*"}, r"matches nested modules"),
        ({"attention": "self_attn"}, r"StructurePatterns\.attention='self_attn' matches no module.*'attn', 'attn\.q'"),
        ({"mlp": "ffn"}, r"StructurePatterns\.mlp='ffn' matches no module under 'encoder\.layers\.0'.*'ff'"),
        ({"mlp_norm": "ln2"}, r"StructurePatterns\.mlp_norm='ln2'.*'norm2'"),
        ({"attention_roles": {"q": "query"}}, r"attention_roles\['q'\]='query'.*'out'"),
        ({"mlp_roles": {"act": "1"}}, r"mlp_roles\['act'\]='1' is a GELU, not a linear"),
        ({"lm_head": "lm_head"}, r"StructurePatterns\.lm_head='lm_head' matches no module.*'head'"),
    ],
)
def test_pattern_errors(change: dict[str, Any], match: str) -> None:
    kwargs = {**CUSTOM_PATTERNS.__dict__, **change}
    with pytest.raises(ValueError, match=match):
        get_structure(Custom(), StructurePatterns(**kwargs))


def test_num_heads_required_without_config() -> None:
    with pytest.raises(ValueError, match=r"StructurePatterns\.num_heads is required"):
        get_structure(Custom(), StructurePatterns(blocks=r"encoder\.layers\.\d+", attention="attn", mlp="ff"))
