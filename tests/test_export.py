"""The kohya export, checked rather than assumed: loaded back through diffusers' kohya loader it
gives the original layer outputs; its names are real SDXL module names; alpha/rank survives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl_ablate.model import kohya
from sdxl_ablate.config import LoraConfig, Targets
from sdxl_ablate.export.lora_export import (
    DORA_NOTE,
    KohyaModule,
    base_model,
    kohya_metadata,
    ExportError,
    kohya_filename,
    main,
    to_kohya,
    write_kohya,
)
from sdxl_ablate.model.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, load_lora, save_lora, saved_configs
from sdxl_ablate.model.sdxl import build_sdxl_random, build_tiny, build_unet

from .test_lora import SEED, outputs, trained_like

# Every axis of the study: targets, text encoders, DoRA, dropout, and several rank/alpha pairs
# (alpha/rank = 2, 0.5, 1, 4: a lost alpha shows as a wrong strength).
VARIANTS = [
    LoraConfig(targets=Targets.attn, rank=4, alpha=8.0),
    LoraConfig(targets=Targets.all, rank=8, alpha=4.0),
    LoraConfig(targets=Targets.attn, text_encoder=True, rank=4, alpha=4.0),
    LoraConfig(targets=Targets.all, text_encoder=True, rank=2, alpha=8.0),
    LoraConfig(targets=Targets.attn, use_dora=True, rank=4, alpha=8.0),
    LoraConfig(targets=Targets.all, use_dora=True, text_encoder=True, rank=4, alpha=2.0),
    LoraConfig(targets=Targets.attn, dropout=0.5, rank=4, alpha=8.0),
]


def _id(c: LoraConfig) -> str:
    return f"{c.targets.value}-te{int(c.text_encoder)}-dora{int(c.use_dora)}-drop{c.dropout}-r{c.rank}a{c.alpha:g}"


def adapted_names(model) -> list[str]:
    return [n.removesuffix(".base_layer") for n, _ in model.named_modules() if n.endswith(".base_layer")]


def layer_outputs(pipe_like, names: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """{component.module: output} of the named modules during one `outputs` pass, plus the three
    final outputs."""
    got, hooks = {}, []
    for component, module_names in names.items():
        model = getattr(pipe_like, component)
        for name in module_names:
            def hook(_m, _i, out, key=f"{component}.{name}"):
                got[key] = out.detach().clone()
            hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        finals = outputs(pipe_like.unet, pipe_like.text_encoder, pipe_like.text_encoder_2)
    finally:
        for h in hooks:
            h.remove()
    got.update({"unet.out": finals[0], "text_encoder.out": finals[1], "text_encoder_2.out": finals[2]})
    return got


def load_kohya_with_diffusers(pipe, path, adapter: str) -> None:
    """diffusers' kohya loader. Its `load_lora_weights` drops `dora_scale` (with a warning), so
    for a DoRA file the same loader is run step by step with the magnitudes kept: diffusers'
    own SGM-block and kohya-key conversion, then its peft loading; the only step added here is
    the reshape of each [out, 1, ...] dora_scale to peft's magnitude shape."""
    state = load_file(str(path))
    if not any(k.endswith(".dora_scale") for k in state):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    else:
        from diffusers.loaders.lora_conversion_utils import (
            _convert_non_diffusers_lora_to_diffusers,
            _maybe_map_sgm_blocks_to_diffusers,
        )

        state = _maybe_map_sgm_blocks_to_diffusers(state, pipe.unet.config)
        state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
        state = {k: v.reshape(1, -1, 1, 1) if "magnitude" in k and v.dim() == 4 else
                 v.reshape(-1) if "magnitude" in k else v for k, v in state.items()}
        pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=adapter, _pipeline=pipe)
        for prefix in ("text_encoder", "text_encoder_2"):
            pipe.load_lora_into_text_encoder(state, alphas, getattr(pipe, prefix), prefix=prefix,
                                             adapter_name=adapter, _pipeline=pipe)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        getattr(pipe, component).eval()


@pytest.mark.parametrize("cfg", VARIANTS, ids=_id)
def test_kohya_file_loaded_by_diffusers_gives_the_original_layer_outputs(cfg, tmp_path):
    trained = trained_like(cfg)
    for m in (trained.unet, trained.text_encoder, trained.text_encoder_2):
        m.eval()
    names = {c: adapted_names(getattr(trained, c)) for c in ("unet", "text_encoder", "text_encoder_2")}
    expected = layer_outputs(trained, names)
    diffusers_file = save_lora(trained, tmp_path)
    kohya_file = write_kohya(diffusers_file, tmp_path / "k.safetensors", "variant",
                             unet_config=trained.unet.config)  # fp16, the default

    tensors = load_file(kohya_file)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == sum(map(len, names.values()))  # one alpha per adapted module
    assert all(v.dtype == torch.float32 and v.item() == cfg.alpha for v in alphas.values())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors) == cfg.text_encoder
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors) == cfg.text_encoder
    assert sum(k.endswith(".dora_scale") for k in tensors) == (len(alphas) if cfg.use_dora else 0)

    pipe = build_tiny(SEED).pipeline()
    base = layer_outputs(pipe, names)
    load_kohya_with_diffusers(pipe, kohya_file, "kohya")
    assert sorted(adapted_names(pipe.unet)) == sorted(names["unet"])  # the same modules, no more
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        scalings = {m.scaling["kohya"] for m in model.modules() if hasattr(m, "scaling") and "kohya" in m.scaling}
        # alpha/rank survives: every module scaled exactly as in training
        assert scalings == ({cfg.alpha / cfg.rank} if component == "unet" or cfg.text_encoder else set())
    got = layer_outputs(pipe, names)

    assert got.keys() == expected.keys()
    for key in expected:
        effect = (expected[key] - base[key]).abs().max()
        err = (got[key] - expected[key]).abs().max()
        # fp16 weights: the error is a rounding of the LoRA's effect, never a share of it.
        assert err <= 5e-3 * effect + 1e-6, f"{key}: error {err:.3g} for an effect of {effect:.3g}"
    assert (expected["unet.out"] - base["unet.out"]).abs().max() > 1e-2  # the LoRA does change the output
    if cfg.text_encoder:
        assert (expected["text_encoder_2.out"] - base["text_encoder_2.out"]).abs().max() > 1e-3


def test_a_kohya_file_without_alpha_is_caught_by_the_check(tmp_path):
    """The comparison above can fail: without `.alpha` (the bug of the old files) tools apply
    scale 1.0 instead of alpha/rank, and the outputs differ."""
    cfg = LoraConfig(targets=Targets.attn, rank=4, alpha=8.0)
    trained = trained_like(cfg)
    trained.unet.eval()
    names = {"unet": adapted_names(trained.unet)}
    expected = layer_outputs(trained, names)
    kohya_file = write_kohya(save_lora(trained, tmp_path), tmp_path / "k.safetensors", "v",
                             unet_config=trained.unet.config)
    state = load_file(kohya_file)
    save_file({k: v for k, v in state.items() if not k.endswith(".alpha")}, str(kohya_file))
    pipe = build_tiny(SEED).pipeline()
    load_kohya_with_diffusers(pipe, kohya_file, "kohya")
    got = layer_outputs(pipe, names)
    assert (got["unet.out"] - expected["unet.out"]).abs().max() > 1e-2


def test_kohya_tools_arithmetic_gives_the_trained_weight_delta(tmp_path):
    """What ComfyUI / A1111 / sd-scripts compute from the file, written out independently of any
    loader: delta W = alpha / rank * up @ down (convs flattened), per module, equals peft's delta."""
    cfg = LoraConfig(targets=Targets.all, text_encoder=True, rank=2, alpha=8.0)
    trained = trained_like(cfg)
    tensors = load_file(write_kohya(save_lora(trained, tmp_path), tmp_path / "k.safetensors", "v",
                                    unet_config=trained.unet.config, dtype=torch.float32))
    block_map = kohya.sgm_block_map(trained.unet.config)
    checked = 0
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(trained, component)
        for name in adapted_names(model):
            key = kohya.unet_key(name, block_map) if component == "unet" else kohya.text_encoder_key(component, name)
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
            scale = tensors[f"{key}.alpha"].item() / down.shape[0]
            module = model.get_submodule(name)
            delta = (scale * up.flatten(1) @ down.flatten(1)).reshape(module.base_layer.weight.shape)
            torch.testing.assert_close(delta, module.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == len(tensors) // 3


# --- names: derived from the config, and real SDXL module names ------------------------------


def target_names(model, targets) -> list[str]:
    """The modules peft's suffix matching picks for `targets`, as lora.add_adapters would."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in targets)]


def diffusers_names_of(kohya_modules: list[str], unet_config) -> dict[str, str]:
    """{kohya module: diffusers module} as diffusers' kohya loader maps it."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state = {}
    for k in kohya_modules:  # the values only carry the kohya name through the conversion
        state[f"{k}.lora_down.weight"] = state[f"{k}.lora_up.weight"] = k
    state = _maybe_map_sgm_blocks_to_diffusers(state, unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    unet = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()
                                            if k.startswith("unet.")})
    out = {v: k.split(".lora_A.")[0] for k, v in unet.items() if ".lora_A." in k}
    for k, v in converted.items():
        if k.startswith("text_encoder") and ".down." in k:
            out[v] = k.split(".", 1)[1].replace(".to_q_lora.down.weight", ".q_proj").replace(
                ".to_k_lora.down.weight", ".k_proj").replace(".to_v_lora.down.weight", ".v_proj").replace(
                ".to_out_lora.down.weight", ".out_proj")
    return out


@pytest.fixture(scope="module")
def full_sdxl():
    return build_sdxl_random("meta", with_vae=False)


@pytest.mark.parametrize("targets,modules", [(Targets.attn, 560), (Targets.all, 784)])
def test_full_sdxl_unet_keys_are_real_module_names(full_sdxl, targets, modules):
    unet = full_sdxl.unet
    block_map = kohya.sgm_block_map(unet.config)
    names = target_names(unet, UNET_TARGETS[targets])
    # 70 transformer blocks x 2 attentions x 4 projections (the "0 of 1120 keys")
    assert len(names) == modules
    keys = {kohya.unet_key(n, block_map): n for n in names}
    assert len(keys) == len(names)  # no two modules share a name
    back = diffusers_names_of(list(keys), unet.config)
    assert back == keys  # diffusers' kohya loader maps every name back to its module
    for name in back.values():
        unet.get_submodule(name)
    # Facts of the original SDXL checkpoint layout (ComfyUI / A1111 / sd-scripts names).
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_v" in keys
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_q" in keys
    assert not any(k.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_6_")) and "attn" in k
                   for k in keys)  # the 320-channel level has no attention
    sgm_blocks = {"_".join(k.split("_")[2:5]) for k in keys}
    if targets == Targets.attn:
        assert sgm_blocks == {*(f"input_blocks_{i}" for i in (4, 5, 7, 8)), "middle_block_1",
                              *(f"output_blocks_{i}" for i in range(6))}
    else:
        assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_out_layers_3",
                "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_4_0_skip_connection",
                "lora_unet_middle_block_2_in_layers_2", "lora_unet_middle_block_0_emb_layers_1",
                "lora_unet_output_blocks_8_0_skip_connection", "lora_unet_input_blocks_7_1_proj_in",
                "lora_unet_middle_block_1_proj_out", "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_0_proj",
                "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2"} <= keys.keys()
        assert not any("input_blocks_3_" in k or "input_blocks_6_" in k for k in keys)  # downsamplers


def test_full_sdxl_text_encoder_keys_are_real_module_names(full_sdxl):
    keys = {}
    for component, layers in (("text_encoder", 12), ("text_encoder_2", 32)):
        model = getattr(full_sdxl, component)
        names = target_names(model, TEXT_ENCODER_TARGETS)
        assert len(names) == 4 * layers
        for n in names:
            keys[kohya.text_encoder_key(component, n)] = (component, n)
    assert "lora_te1_text_model_encoder_layers_11_self_attn_out_proj" in keys
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in keys
    assert all(k.startswith(("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for k in keys)
    back = diffusers_names_of(list(keys), full_sdxl.unet.config)
    for key, path in back.items():
        component, name = keys[key]
        model = getattr(full_sdxl, component)
        # diffusers names the module with `text_model.`; it is that module in either transformers
        assert path == kohya.canonical_text_encoder_name(name)
        from sdxl_ablate.model.lora import find_module

        assert find_module(model, path) is model.get_submodule(name)


def test_the_sgm_map_is_derived_from_the_config_not_fixed_to_sdxl():
    tiny = kohya.sgm_block_map(build_unet("tiny", "meta").config)
    # The tiny UNet has two levels (SDXL three): its upsampler is in output block 2, its
    # last output block is 5, and it has a single downsampler.
    assert tiny["down_blocks.0.downsamplers.0"] == "input_blocks.3.0"
    assert "down_blocks.1.downsamplers.0" not in tiny
    assert tiny["down_blocks.1.attentions.1"] == "input_blocks.5.1"
    assert tiny["up_blocks.0.upsamplers.0"] == "output_blocks.2.2"
    assert tiny["up_blocks.1.resnets.2"] == "output_blocks.5.0"
    assert max(int(v.split(".")[1]) for v in tiny.values() if v.startswith("output")) == 5
    # A hand-worked layout: 3 levels, one ResNet each, attention on the last level only.
    cfg = {"block_out_channels": [8, 16, 32], "layers_per_block": 1,
           "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}
    m = kohya.sgm_block_map(cfg)
    assert m["down_blocks.1.resnets.0"] == "input_blocks.3.0"
    assert m["down_blocks.1.downsamplers.0"] == "input_blocks.4.0"
    assert m["down_blocks.2.attentions.0"] == "input_blocks.5.1"
    assert m["up_blocks.0.upsamplers.0"] == "output_blocks.1.2"
    assert m["up_blocks.1.upsamplers.0"] == "output_blocks.3.1"
    assert m["up_blocks.2.resnets.1"] == "output_blocks.5.0"
    assert kohya.sgm_module_name("down_blocks.0.downsamplers.0.conv", m) == "input_blocks.2.0.op"
    assert kohya.sgm_module_name("up_blocks.1.resnets.0.time_emb_proj", m) == "output_blocks.2.0.emb_layers.1"
    with pytest.raises(kohya.NamingError, match="down_blocks.7.resnets.0.conv1"):
        kohya.sgm_module_name("down_blocks.7.resnets.0.conv1", m)
    with pytest.raises(kohya.NamingError, match="layers_per_block"):
        kohya.sgm_block_map({**cfg, "layers_per_block": [1, 2]})


# --- metadata, dtype, the file name ---------------------------------------------------------


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("cfg", [VARIANTS[0], VARIANTS[1], VARIANTS[5]], ids=_id)
def test_metadata_the_tools_display(cfg, tmp_path):
    trained = trained_like(cfg)
    path = write_kohya(save_lora(trained, tmp_path), tmp_path / "k.safetensors", "lora.targets=all,lora.rank=4",
                       resolution=512, unet_config=trained.unet.config)
    meta = _meta(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # A1111/Forge: an SDXL LoRA
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == meta["ss_output_name"] == "lora.targets=all,lora.rank=4"
    assert meta["modelspec.resolution"] == "512x512"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(cfg.rank), f"{cfg.alpha:g}")
    assert meta["ss_network_train_unet_only"] == str(not cfg.text_encoder)
    args = json.loads(meta.get("ss_network_args", "{}"))
    if cfg.targets == Targets.all:  # 3x3 convs are targeted
        assert (args["conv_dim"], args["conv_alpha"]) == (str(cfg.rank), f"{cfg.alpha:g}")
    else:
        assert "conv_dim" not in args
    assert meta["ss_network_module"] == ("lycoris.kohya" if cfg.use_dora else "networks.lora")
    assert (DORA_NOTE in meta["modelspec.description"]) == cfg.use_dora
    if cfg.use_dora:
        tensors = load_file(path)
        scale = tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale"]
        assert scale.shape == (64, 1)  # [out, 1]: ComfyUI's output-axis form
        conv = tensors["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"]
        assert conv.shape == (32, 1, 1, 1)
        magnitude = trained.unet.get_submodule("down_blocks.0.resnets.0.conv1").lora_magnitude_vector["default"].weight
        assert torch.equal(conv.flatten(), magnitude.detach().flatten().half())


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_dtype_option(dtype, name, tmp_path):
    trained = trained_like(LoraConfig(targets=Targets.attn, rank=4, alpha=16.0))
    src = save_lora(trained, tmp_path)
    out = tmp_path / f"{name}.safetensors"
    assert main([str(src), "--format", "kohya", "--dtype", name, "--out", str(out)]) == 0
    tensors = load_file(out)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {dtype}
    fp32 = load_file(src)
    a = fp32["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert torch.equal(tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"],
                       a.to(dtype))


def test_kohya_filename_is_safe_and_readable():
    assert kohya_filename("lora.targets=all,lora.rank=4") == "lora.targets-all_lora.rank-4_kohya.safetensors"
    assert kohya_filename("a b/c:d") == "a_b_c_d_kohya.safetensors"
    assert kohya_filename("") == "lora_kohya.safetensors"


# --- the diffusers file: deterministic, one naming ------------------------------------------


def test_diffusers_file_has_canonical_names_and_no_dropout(tmp_path):
    trained = trained_like(LoraConfig(targets=Targets.attn, text_encoder=True, dropout=0.5, use_dora=True))
    path = save_lora(trained, tmp_path)
    keys = load_file(path).keys()
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)
    assert all(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in keys if k.startswith("text_encoder_2."))
    assert {c["lora_dropout"] for c in saved_configs(path).values()} == {0.0}

    pipe = build_tiny(SEED).pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)  # the plain call the README shows
    first = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    second = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    # peft creates the adapter's modules in train mode whatever the model's mode: a saved dropout
    # would be an active Dropout here.
    dropouts = [d for m in pipe.unet.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(isinstance(d, torch.nn.Identity) for d in dropouts)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_old_files_convert_to_the_canonical_diffusers_file(tmp_path):
    """A file in the other spelling (transformers 5's `text_encoder.encoder.layers...`) with
    dropout in its metadata: load_lora still verifies it (by module), and the diffusers export
    writes the canonical file."""
    trained = trained_like(LoraConfig(targets=Targets.attn, text_encoder=True, dropout=0.5))
    path = save_lora(trained, tmp_path / "new")
    meta = _meta(path)
    configs = json.loads(meta["lora_adapter_metadata"])
    configs = {k: (0.5 if k.endswith(".lora_dropout") else v) for k, v in configs.items()}
    old = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(path).items()}
    assert any(k.startswith("text_encoder.encoder.layers.") for k in old)
    old_file = tmp_path / "old" / "pytorch_lora_weights.safetensors"
    old_file.parent.mkdir()
    save_file(old, str(old_file), metadata={**meta, "lora_adapter_metadata": json.dumps(configs)})

    pipe = build_tiny(SEED).pipeline()
    load_lora(pipe, old_file)  # no "40 tensors missing": verified by module, not by spelling
    expected = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)

    out = tmp_path / "converted.safetensors"
    assert main([str(old_file), "--format", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
    assert load_file(out).keys() == load_file(path).keys()
    assert {c["lora_dropout"] for c in saved_configs(out).values()} == {0.0}
    pipe = build_tiny(SEED).pipeline()
    load_lora(pipe, out)
    got = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# --- the command line and the runner ----------------------------------------------------------


def test_bad_sources_fail_with_what_is_accepted(tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert main(["no/such/file.safetensors", "--out", out]) == 2
    assert "neither an existing LoRA file nor an MLflow run id" in capsys.readouterr().err
    assert main(["0" * 32, "--out", out, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()  # looking up creates no store
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path}/m.db").search_experiments()  # an empty store
    assert main(["0" * 32, "--out", out, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "no such run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x", "--dtype", "fp8", "--out", out])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x", "--out", str(tmp_path / "x.ckpt")])
    assert "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no adapter config"):
        to_kohya({"unet": {"down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(1, 1)}}, {})


def test_every_finished_run_logs_the_kohya_file_and_the_cli_exports_by_run_id(tmp_path):
    from mlflow.tracking import MlflowClient

    from sdxl_ablate.run import runner
    from sdxl_ablate.config import to_typed

    from .conftest import compose_config, tiny_overrides

    name = "lora.targets=all,lora.rank=4"
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "study=export", "lora.targets=all", "lora.rank=4",
                                                 "lora.alpha=8", "trainer.max_steps=1")))
    assert runner.run(cfg, name, tmp_path / "out") is not None
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("export").experiment_id])[0]
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "lora"))
    assert logged == ["lora/lora.targets-all_lora.rank-4_kohya.safetensors", "lora/pytorch_lora_weights.safetensors"]
    artifact = client.download_artifacts(run.info.run_id, logged[0], str(tmp_path / "dl"))
    # A tiny-model run says so: not an SDXL base 1.0 LoRA, in its version, architecture and title.
    meta = _meta(artifact)
    assert meta["modelspec.title"] == f"{name} (tiny test model, random weights)"
    assert meta["ss_base_model_version"] == "sdxl_ablate_tiny" and meta["ss_sd_model_name"].startswith("tiny")
    assert meta["modelspec.architecture"] == "sdxl-ablate-tiny/lora"
    assert "on tiny test model, random weights" in meta["modelspec.description"]

    out = tmp_path / "by_id.safetensors"
    assert main([run.info.run_id, "--tracking-uri", uri, "--out", str(out)]) == 0
    a, b = load_file(artifact), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.item() == 8.0 for k, v in b.items() if k.endswith(".alpha"))
    assert _meta(out)["modelspec.title"] == f"{name} (tiny test model, random weights)"


def test_the_base_model_in_the_metadata_is_what_the_run_trained_on():
    hub = base_model("pretrained", "stabilityai/stable-diffusion-xl-base-1.0")
    assert (hub.version, hub.name) == ("sdxl_base_v1-0", "stabilityai/stable-diffusion-xl-base-1.0")
    assert base_model("sdxl_random").version == "sdxl_ablate_random"
    assert "random weights" in base_model("sdxl_random").name and "random weights" in base_model("tiny").name
    with pytest.raises(ExportError, match="model.kind='sd15': expected one of pretrained, tiny, sdxl_random"):
        base_model("sd15")
    meta = kohya_metadata([KohyaModule("lora_unet_x", "unet", 4, 4.0, 1)], "te_all seed=1", False, base=hub)
    assert meta["modelspec.title"] == "te_all seed=1 (stabilityai/stable-diffusion-xl-base-1.0)"
    assert meta["ss_sd_model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert meta["ss_output_name"] == "te_all seed=1"
