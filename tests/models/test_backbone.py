import pytest
import torch
from omegaconf import OmegaConf

from msl_rec.models.backbone import build_backbone, count_trainable
from msl_rec.models.inference import backbone_body, output_weight
from msl_rec.utils.config import CONFIG_DIR


def backbone_cfg(name, **over):
    cfg = OmegaConf.load(f"{CONFIG_DIR}/backbone/{name}.yaml")
    return OmegaConf.merge(cfg, over)


def test_llama3_8b_lora_on_meta():
    model = build_backbone(backbone_cfg("llama3_8b"), on_meta=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "v_proj"}
    assert count_trainable(model) == 3_407_872  # 32 layers x 8 x ((4096+4096) + (4096+1024))
    assert output_weight(model).shape == (128256, 4096)


def test_tiny_llama_is_seeded_and_lora_starts_at_identity():
    a, b = build_backbone(backbone_cfg("tiny_llama")), build_backbone(backbone_cfg("tiny_llama"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        la = a(input_ids=ids).logits
        lb = b(input_ids=ids).logits
        with a.disable_adapter():
            base = a(input_ids=ids).logits
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(la, base)  # B = 0 at init
    assert output_weight(a).shape == (49152, 64)
    h = backbone_body(a)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(h @ output_weight(a).t(), la)


def test_lora_settings_are_overridable():
    model = build_backbone(backbone_cfg("tiny_llama", lora={"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"]}))
    # q: 64->64, k,v: 64->32 (2 kv heads of 16); per layer r*(in+out)
    assert count_trainable(model) == 2 * 4 * ((64 + 64) + 2 * (64 + 32))


def test_merge_adapter_folds_sft_weights_into_base():
    cfg = backbone_cfg("tiny_llama")
    sft = build_backbone(cfg)
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapter = {n: p.detach().clone() for n, p in sft.named_parameters() if "lora_" in n}
    merged = build_backbone(cfg, merge_adapter=adapter)
    ids = torch.tensor([[3, 4, 5]])
    sft.eval(), merged.eval()
    with torch.no_grad():
        want = sft(input_ids=ids).logits
        with merged.disable_adapter():
            got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_adapter_of_another_rank_is_a_named_error():
    """peft / torch would raise a bare size mismatch; the error names the source and the LoRA setting."""
    small = build_backbone(backbone_cfg("tiny_llama", lora={"r": 4}))
    adapter = {n: p.detach().clone() for n, p in small.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match=r"SFT checkpoint x.ckpt: LoRA shapes do not match backbone 'tiny_llama' "
                                         r"with backbone.lora=.*'r': 8.*\(4, 64\) vs \(8, 64\)"):
        build_backbone(backbone_cfg("tiny_llama"), merge_adapter=adapter, merge_source="SFT checkpoint x.ckpt")


@pytest.mark.slow
def test_smollm2_loads_from_gguf_cache():
    model = build_backbone(backbone_cfg("smollm2_135m"))
    assert count_trainable(model) == 30 * 8 * ((576 + 576) + (576 + 192))
