"""Composite models (vision-language and omni wrappers): the text decoder inside a
`…ForConditionalGeneration` is quantized, the towers are copied byte for byte, and the output
keeps the composite's architecture and the checkpoint's names.

Tiny models are built from transformers' own configs with every sub-config shrunk (text, vision,
audio) and saved with `save_pretrained`; runs use 4 × 16 tokens so each takes a few seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors import safe_open

import moedsl
from moedsl.errors import MoedslError
from moedsl.lang.library import for_model
from moedsl.lang.parser import parse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack_reference import dequantize_gptq, read_checkpoint  # noqa: E402

COMPOSITES = ("glm4v_moe", "ernie4_5_vl_moe", "qwen3_omni_moe", "llama4", "aria", "qwen3_5_moe", "kimi_k25",
              "qwen3_omni_moe_thinker", "qwen3_vl_moe", "unlimited_ocr", "mistral_large4")
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def _source_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def _tower_keys(model_dir: Path, plan) -> list[str]:
    from moedsl.execute.loader import LayerwiseLoader

    loader = LayerwiseLoader(model_dir, layers_path=plan.layers_path)
    loader.skeleton()
    return loader.tower_keys(plan.towers)


def _source_weight(source: dict[str, torch.Tensor], name: str, transposed: bool) -> torch.Tensor:
    """The source weight of quantized module `name`: its own `.weight`, or (checkpoints that keep the experts
    fused, as `gate_up_proj`/`down_proj` or Aria's `fc1.weight`/`fc2.weight`: [E, 2I, H] gate|up and [E, H, I]
    down, or `transposed` as Llama 4 and Aria store them, [E, H, 2I] and [E, I, H]) its slice of the fused tensor."""
    if name + ".weight" in source:
        return source[name + ".weight"]
    block, _, rest = name.rpartition(".experts.")
    e, role = rest.split(".")

    def fused(*keys: str) -> torch.Tensor:
        return next(source[f"{block}.experts.{k}"] for k in keys if f"{block}.experts.{k}" in source)

    if role == "down_proj":
        down = fused("down_proj", "fc2.weight")[int(e)]
        return down.t() if transposed else down
    gate_up = fused("gate_up_proj", "fc1.weight")[int(e)]
    gate_up = gate_up.t() if transposed else gate_up
    half = gate_up.shape[0] // 2
    return gate_up[:half] if role == "gate_proj" else gate_up[half:]


@pytest.mark.parametrize("policy", ["all", "routed"])
@pytest.mark.parametrize("model_type", COMPOSITES)
def test_quantize_composite(model_type, policy, tiny_model, tmp_path):
    from transformers import AutoConfig

    from moedsl.models.tiny import model_class
    from moedsl.plan.compiler import compile_plan
    from moedsl.models.source import build, config_from_file

    from moedsl.models.tiny import available_tiny

    if not available_tiny((model_type,)):
        pytest.skip(f"transformers {transformers.__version__} has no `{model_type}` (a newer model type)")
    if model_type == "aria" and Version(transformers.__version__) < Version("5.18"):
        # AriaConfig of 5.17 keeps a shrunk text_config as a dict, which its model cannot build from
        pytest.skip("the tiny-model builder cannot build a shrunk Aria composite on transformers 5.17")
    src = tiny_model(model_type)
    out = tmp_path / "out"
    report = moedsl.quantize(model=src, out=out, group_size=-1, samples=4, seq_len=16, policy=policy, progress=False)
    assert report.layers and all(layer["stages"] for layer in report.layers)

    # the output config is the composite's, with the quantization config added
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((src / "config.json").read_text())
    assert config["model_type"] == source_config["model_type"] == model_type
    # the class vLLM registers for the family where transformers' name differs (moedsl.write.engines)
    from moedsl.write.engines import VLLM_ARCHITECTURES

    assert config["architectures"] == [VLLM_ARCHITECTURES[a].name if a in VLLM_ARCHITECTURES else a
                                       for a in source_config["architectures"]]
    assert config["quantization_config"]["quant_method"] == "gptq"

    # by model_type, not by name: the arch `qwen3_5_moe` is the text model's, `qwen3_5_moe_vl` matches the composite
    plan = compile_plan(for_model({"model_type": model_type}), build(config_from_file(src / "config.json"), "meta"))
    transposed = any(t.layout == "E,in,out" for k in plan.kinds for st in k.stages for t in st.targets
                     if t.kind == "fused")
    assert plan.language_model and plan.towers
    towers = _tower_keys(src, plan)
    assert towers, "the tiny model has tower tensors"
    source = _source_tensors(src)
    written = read_checkpoint(out)

    # every tower tensor is copied byte for byte under its checkpoint name
    for key in towers:
        assert written[key].dtype == source[key].dtype and torch.equal(written[key], source[key]), key

    # every quantized module is a weight of the source checkpoint, under the checkpoint's own name,
    # and dequantizes (independent reader) close to it; nothing of a tower is quantized
    qcfg = json.loads((out / "quantize_config.json").read_text())
    quantized = sorted(k.removesuffix(".qweight") for k in written if k.endswith(".qweight"))
    assert quantized
    for name in quantized:
        assert name + ".weight" not in towers, name
        W = _source_weight(source, name, transposed).float().numpy()
        Q = dequantize_gptq(written, name, qcfg)["weight"]
        assert Q.shape == W.shape, name
        # a module written under another module's name would sit at about √2 (independent weights);
        # GPTQ moves a weight further from its source than rounding does when its expert saw few
        # routed tokens (0.30 for one such expert of qwen3_omni_moe under `routed`)
        assert np.linalg.norm(Q - W) / np.linalg.norm(W) < 0.5, name
    # every source tensor is in the output: copied, or replaced by its quantized form
    for key in source:
        fused_experts = key.endswith((".experts.gate_up_proj", ".experts.down_proj", ".experts.fc1.weight",
                                      ".experts.fc2.weight"))
        assert key in written or key.removesuffix(".weight") in quantized or fused_experts, key

    # transformers loads the output with the composite's class: every tower tensor unchanged, and
    # the only keys it cannot place are the packed GPTQ tensors of the quantized modules
    plain = tmp_path / "plain-config"
    plain.mkdir()
    for f in out.iterdir():
        (plain / f.name).symlink_to(f)
    (plain / "config.json").unlink()
    (plain / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    cls = model_class(AutoConfig.from_pretrained(plain))
    loaded, info = cls.from_pretrained(plain, output_loading_info=True, ignore_mismatched_sizes=True)
    assert all(k.endswith(QUANT_SUFFIXES) for k in info["unexpected_keys"]), info["unexpected_keys"][:5]
    # (without a GPTQ kernel the quantized modules stay uninitialized; ERNIE-VL's conversion, which splits
    # one list of experts into text and vision experts, then sees only the unquantized vision half)
    lm_weights = tuple({plan.layers_path, *(p for p in (plan.lm_head,) if p)})
    assert all(k.startswith(lm_weights) for k in info["missing_keys"]), info["missing_keys"][:5]
    assert all(k[0].startswith(lm_weights) for k in info["mismatched_keys"]), info["mismatched_keys"][:5]
    state = loaded.state_dict()
    reference = cls.from_pretrained(src).state_dict()
    for name, tensor in reference.items():
        if name.startswith(tuple(t + "." for t in plan.towers)):
            assert torch.equal(state[name], tensor), name


def test_quantized_names_follow_the_checkpoint(tiny_model, tmp_path):
    """Qwen3-Omni's checkpoint calls the thinker's layers `thinker.model.layers`, the runtime model
    `thinker.model.language_model.layers`: the output keeps the checkpoint's names."""
    src = tiny_model("qwen3_omni_moe")
    out = tmp_path / "out"
    moedsl.quantize(model=src, out=out, group_size=-1, samples=4, seq_len=16, progress=False)
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "thinker.model.layers.0.self_attn.q_proj.qweight" in keys
    assert "thinker.model.layers.1.mlp.experts.7.down_proj.qweight" in keys
    assert not any(k.startswith("thinker.model.language_model.") for k in keys)
    assert any(k.startswith("thinker.audio_tower.") for k in keys)


def test_validate_against_a_model_directory(tiny_model):
    reports = moedsl.validate("qwen3_omni_moe", model_dir=tiny_model("qwen3_omni_moe"))
    assert reports[0].ok, reports[0].problems


# ---- errors -------------------------------------------------------------------------------------


def test_text_definition_on_a_composite_is_one_located_error(tiny_model, cli):
    """Defect 6: a text model's definition against a composite config used to fail with an
    unlocated 3.4 kB list of config classes; now one located error says what to declare."""
    config = tiny_model("glm4v_moe") / "config.json"
    r = cli("validate", "model_defs/glm4_moe.moedef", "--config", str(config))
    assert r.returncode == 2
    err = r.stdout + r.stderr
    assert "Traceback" not in err and "Unrecognized configuration class" not in err
    assert "glm4_moe.moedef:5:1:" in err
    assert "composite model" in err and "model.language_model.layers" in err
    assert len(err) < 1500


def test_tower_that_does_not_exist(tiny_model):
    from moedsl.lang.resolve import resolve
    from moedsl.lang.library import find

    text = (Path(moedsl.__file__).parents[1] / "model_defs" / "glm4v_moe.moedef").read_text()
    text = text.replace("towers model.visual", "towers model.visaul")
    d = resolve(parse(text, "bad.moedef"), find)
    reports = moedsl.validate(d)
    problems = "\n".join(reports[0].problems)
    assert not reports[0].ok
    assert "bad.moedef:" in problems and "tower `model.visaul` does not exist" in problems
    assert "did you mean `model.visual`?" in problems


def test_weights_outside_language_model_and_towers_are_refused():
    from moedsl.lang.resolve import resolve
    from moedsl.lang.library import find

    text = (Path(moedsl.__file__).parents[1] / "model_defs" / "llama4.moedef").read_text()
    text = text.replace("towers vision_model, multi_modal_projector", "towers vision_model")
    d = resolve(parse(text, "bad.moedef"), find)
    problems = "\n".join(moedsl.validate(d)[0].problems)
    assert "`multi_modal_projector` (1 parameter(s)) is outside `language_model language_model` and in no tower" \
        in problems


@pytest.mark.parametrize("header, message", [
    ("text_config config.txt_config", "`text_config`: config has no attribute `txt_config`"),
    ("text_config config.text_config.hidden_size", "`text_config` must name a sub-config"),
    ("language_model model.visual", "is not inside `language_model model.visual`"),
])
def test_composite_header_errors(header, message):
    from moedsl.lang.resolve import resolve
    from moedsl.lang.library import find

    text = (Path(moedsl.__file__).parents[1] / "model_defs" / "glm4v_moe.moedef").read_text()
    word = header.split()[0]
    lines = [line for line in text.splitlines() if not line.startswith(word + " ")]
    d = resolve(parse("\n".join(lines + [header]) + "\n", "bad.moedef"), find)
    problems = "\n".join(moedsl.validate(d)[0].problems)
    assert message in problems and "bad.moedef:" in problems


def test_tower_annotation_other_than_optional_is_a_parse_error():
    with pytest.raises(MoedslError) as exc:
        parse("arch x\nlayers model.layers\ntowers model.visual:!\nlayer a otherwise {}\n", "t.moedef")
    assert "a tower takes only `:?`" in exc.value.render() and "t.moedef:3:20" in exc.value.render()


def test_plan_names_the_language_model_and_towers(tiny_model, cli):
    r = cli("plan", "qwen3_omni_moe", "--config", str(tiny_model("qwen3_omni_moe") / "config.json"))
    assert r.returncode == 0, r.stderr
    assert "language model thinker.model.language_model (calibrated on text)" in r.stdout
    assert "towers copied unquantized: thinker.model.audio_tower, thinker.model.visual" in r.stdout


def test_processor_files_are_written_and_reach_the_output(tiny_model, tmp_path):
    """A vision-language model's image processor (transformers' own class at its defaults) is written beside
    the tiny checkpoint, and quantize copies it into the output, where transformers loads the same processor:
    vLLM refuses a vision-language directory without it ("Can't load image processor")."""
    pytest.importorskip("PIL", reason="transformers' PIL-backed image processors need pillow (requirements/cpu.txt)")
    import shutil

    from transformers import AutoImageProcessor

    from moedsl.models.tiny import save_processor

    src = tmp_path / "src"
    shutil.copytree(tiny_model("glm4v_moe"), src)
    # glm4v_moe's processor is glm4v's (Glm4vProcessor): its image processor comes from that family
    assert save_processor("glm4v_moe", src) == ["preprocessor_config.json"]
    loaded = AutoImageProcessor.from_pretrained(src)
    assert type(loaded).__name__.startswith("Glm4vImageProcessor")
    out = tmp_path / "out"
    moedsl.quantize(model=src, out=out, group_size=-1, samples=4, seq_len=16, progress=False)
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()
    again = AutoImageProcessor.from_pretrained(out)
    assert type(again) is type(loaded) and again.to_dict() == loaded.to_dict()


def test_kimi_k25_processor_files_are_the_releases(tiny_model, tmp_path):
    """Kimi-K2.5's release ships its remote-code processor's preprocessor_config.json (`media_proc_cfg`), which
    vLLM's own image processor reads (transformers' class is torchvision-only), and vLLM finds the media token
    `<|media_pad|>` in the tokenizer: both written, the token's id in config.json (quantize copies processor files:
    test_processor_files_are_written_and_reach_the_output)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from moedsl.models.tiny import save_processor

    src = tmp_path / "src"
    shutil.copytree(tiny_model("kimi_k25"), src)
    assert save_processor("kimi_k25", src) == ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                                               "config.json"]
    media = json.loads((src / "preprocessor_config.json").read_text())["media_proc_cfg"]
    # the keys vllm/transformers_utils/processors/kimi_k25_vision_fused.py reads
    assert {"patch_size", "merge_kernel_size", "in_patch_limit", "patch_limit_on_one_side", "fixed_output_tokens",
            "temporal_merge_kernel_size", "in_patch_limit_each_frame", "in_patch_limit_video", "image_mean",
            "image_std"} <= set(media)
    config = json.loads((src / "config.json").read_text())
    assert media["patch_size"] == config["vision_config"]["patch_size"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    assert tokenizer.convert_tokens_to_ids("<|media_pad|>") == config["image_token_id"]
    assert config["image_token_id"] < config["text_config"]["vocab_size"]


def test_qwen3_omni_thinker_gets_qwen3_omnis_processor_files(tmp_path):
    """Qwen3-Omni's thinker saved on its own has a model_type transformers maps no processor to: its
    preprocessor_config.json names Qwen3OmniMoeProcessor and holds that processor's image processor and Whisper
    feature extractor (each loads at its defaults), and the tokenizer carries the seven tokens the processor reads,
    their ids in the config. Without it AutoProcessor returned the tokenizer, which vLLM refused ("found type
    TokenizersBackend"); with it, where torchvision is missing, the processor fails on its torchvision-only video
    processor, the engine limit the serving check names."""
    pytest.importorskip("PIL", reason="transformers' PIL-backed image processors need pillow (requirements/cpu.txt)")
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer,
                              Qwen2VLImageProcessorPil, WhisperFeatureExtractor)

    from moedsl.models.tiny import save_processor, tiny_config

    src = tmp_path / "thinker"
    tiny_config("qwen3_omni_moe_thinker").save_pretrained(src)
    written = save_processor("qwen3_omni_moe_thinker", src)
    assert written == ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "config.json"]
    assert json.loads((src / "preprocessor_config.json").read_text())["processor_class"] == "Qwen3OmniMoeProcessor"
    image, features = AutoImageProcessor.from_pretrained(src), AutoFeatureExtractor.from_pretrained(src)
    assert isinstance(image, Qwen2VLImageProcessorPil) and isinstance(features, WhisperFeatureExtractor)
    for loaded, default in ((image, Qwen2VLImageProcessorPil()), (features, WhisperFeatureExtractor())):
        mine = loaded.to_dict()
        assert {k: mine[k] for k in default.to_dict()} == default.to_dict()
    tokenizer, config = AutoTokenizer.from_pretrained(src), AutoConfig.from_pretrained(src)
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) for name in (
        "image_token", "video_token", "audio_token", "audio_bos_token", "audio_eos_token", "vision_bos_token",
        "vision_eos_token")}
    assert len(set(ids.values())) == 7 and max(ids.values()) < config.text_config.vocab_size
    assert (config.image_token_id, config.video_token_id, config.audio_token_id, config.audio_start_token_id) == (
        ids["image_token"], ids["video_token"], ids["audio_token"], ids["audio_bos_token"])
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision cannot even import on this torch: the serving check's state
        with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision library"):
            AutoProcessor.from_pretrained(src)
    else:
        assert type(AutoProcessor.from_pretrained(src)).__name__ == "Qwen3OmniMoeProcessor"


def test_processor_of_a_text_model_is_nothing_and_a_missing_backend_is_named(tmp_path):
    from moedsl.models.tiny import save_processor

    assert save_processor("qwen3_moe", tmp_path / "text") == []
    assert not (tmp_path / "text").exists()
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision cannot even import on this torch: the state this checks
        with pytest.raises(MoedslError) as exc:  # Llama 4's image processor is torchvision-backed only
            save_processor("llama4", tmp_path / "vl")
        assert "llama4: no image processor" in exc.value.render() and "Llama4ImageProcessor" in exc.value.render()
        assert not (tmp_path / "vl").exists()


def test_serving_probe_runs_a_composite_without_forward_through_its_thinker_and_llama4_through_its_causal_lm():
    """Qwen3-Omni's `…ForConditionalGeneration` has no forward of its own: the serving check's reference and
    its transformers probe run the thinker (scripts/serving/hf_probe.py `logits_model`); a causal LM runs itself."""
    import importlib.util

    from moedsl.models.tiny import build_model, tiny_config

    path = Path(__file__).resolve().parents[1] / "scripts" / "serving" / "hf_probe.py"
    spec = importlib.util.spec_from_file_location("hf_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    omni = build_model(tiny_config("qwen3_omni_moe"), "cpu")
    assert probe.logits_model(omni) is omni.thinker
    ids = [3, 1, 4, 1, 5]
    lp = probe.prompt_logprobs(omni, ids)
    with torch.no_grad():
        logits = omni.thinker(input_ids=torch.tensor([ids])).logits[0]
    assert lp == pytest.approx([float(torch.log_softmax(logits, -1)[t, ids[t + 1]]) for t in range(4)])
    text = build_model(tiny_config("qwen3_moe"), "meta")
    assert probe.logits_model(text) is text
    # Llama 4's wrapper calls a complete causal LM, and its own forward fails after it (transformers 5.24):
    # the probe runs that causal LM, which is what the wrapper computes for text
    llama4 = build_model(tiny_config("llama4"), "cpu")
    assert probe.logits_model(llama4) is llama4.language_model
    vl = build_model(tiny_config("glm4v_moe"), "meta")  # a wrapper that owns the head runs itself
    assert probe.logits_model(vl) is vl
