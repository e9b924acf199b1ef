"""Core commands: `spectra init`, `spectra info`, `spectra export hf|gguf`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a randomly initialised model of a named size")
    p.add_argument("size", help="a size name such as trilm-99m, floatlm-tiny (see `spectra info --sizes`)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="override the size's vocabulary (default 50304)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to store with the model")
    p.set_defaults(func=run_init)

    p = sub.add_parser("info", help="parameters and size in bits of a model, a checkpoint or a size name")
    p.add_argument("model", nargs="?", help="a size name (trilm-3.9b) or a model directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--sizes", action="store_true", help="list the named sizes")
    p.set_defaults(func=run_info)

    p = sub.add_parser("export", help="write a model in another ecosystem's format")
    ex = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    e = ex.add_parser("hf", help="a Hugging Face LlamaForCausalLM directory (TriLMs unpacked: weights γ·Ŵ)")
    e.add_argument("src")
    e.add_argument("out_dir")
    e.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    e.set_defaults(func=run_export_hf)
    e = ex.add_parser("gguf", help="a GGUF file for llama.cpp")
    e.add_argument("src")
    e.add_argument("out")
    e.add_argument("--type", default="tq2_0", choices=["tq2_0", "tq1_0", "f16", "q8_0"])
    e.add_argument("--lossy", action="store_true",
                   help="allow 256-weight blocks that straddle two shard scales (rounded to the block absmax, as "
                        "llama.cpp does); needed for TriLMs trained with MP whose shard width is not a multiple of 256")
    e.set_defaults(func=run_export_gguf)


def run_init(args: argparse.Namespace) -> int:
    from spectra.checkpoint import save_model
    from spectra.config import check_seed, from_name
    from spectra.model import build_model

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
    cfg = from_name(args.size, **overrides)
    from spectra.accounting import size_report
    from spectra.train.memory import host_memory

    need = 4 * size_report(cfg)["params"]  # float32 latent weights
    have = host_memory()
    if have and need > have:
        raise ValueError(f"{cfg.name} with vocab_size {cfg.vocab_size} has {need / 4 / 1e9:.2f}e9 parameters, "
                         f"{need / 2**30:.1f} GiB in float32; this machine has {have / 2**30:.1f} GiB of memory")
    tokenizer = args.tokenizer
    if tokenizer is not None:  # checked before it is stored with the model: it must open and fit the vocabulary
        from spectra.data.tokenizer import load_tokenizer, tokenizer_file

        tokenizer = tokenizer_file(tokenizer)
        n = load_tokenizer(tokenizer).get_vocab_size()
        if n > cfg.vocab_size:
            raise ValueError(f"--tokenizer {args.tokenizer} has {n} ids; the model's vocabulary is {cfg.vocab_size} "
                             "(pass --vocab-size)")
    check_seed(args.seed, "--seed")
    save_model(build_model(cfg, seed=args.seed), args.out_dir, tokenizer=tokenizer, meta={"seed": args.seed})
    print(f"wrote {cfg.name} ({cfg.family}) to {args.out_dir}")
    return 0


def model_info(model: str) -> dict:
    """Size report of a size name or a model (or run) directory. The files are checked first: the metadata must
    parse and every safetensors file must be whole (its header read and checked against the file's size). Packed and
    QuantLM checkpoints also report what they really store."""
    from spectra.accounting import size_report
    from spectra.config import ModelConfig, from_name
    from spectra.files import META_FILE, WEIGHTS_FILE, FormatError, read_meta, safetensors_header
    from spectra.loading import KIND_LOADERS, looks_like_path, missing_model, model_dir, not_a_model_dir

    path = Path(model)
    if not path.exists():
        if looks_like_path(model):
            raise missing_model(model)
        return size_report(from_name(model))
    if not path.is_dir():
        raise not_a_model_dir(path)
    path = model_dir(path)
    weights = sorted(path.glob("*.safetensors"))
    if (path / META_FILE).exists():
        meta = read_meta(path)
        cfg = ModelConfig.from_meta(meta, path / META_FILE)
        report = size_report(cfg)
        if not isinstance(meta.get("kind"), str) or meta["kind"] not in KIND_LOADERS:
            raise FormatError(f"{path / META_FILE}: unknown kind {meta.get('kind')!r}; accepted: "
                              f"{sorted(KIND_LOADERS)}")
        report["kind"] = meta.get("kind")
        if not (path / WEIGHTS_FILE).exists():
            raise FormatError(f"{path / WEIGHTS_FILE} is missing")
    else:
        from spectra.files import refuse_pickle
        from spectra.interop.hf import config_from_hf, hf_model_config, read_hf_config, read_hf_weights
        from spectra.ptq.formats import is_gptq_dir

        refuse_pickle(path)
        hf = read_hf_config(path)
        cfg = config_from_hf(hf, str(path / "config.json"))
        gptq = is_gptq_dir(path, hf)
        if not weights:
            raise FormatError(f"{path} holds no .safetensors weights")
        if not gptq:  # every file the index names, and a TriLM's family and scale shards as spectra.load finds them
            cfg = hf_model_config(path, hf, cfg, read_hf_weights(path))
        report = size_report(cfg)
        report["kind"] = "quantlm" if gptq else "hf"
    report["files"] = {f.name: f.stat().st_size for f in weights if safetensors_header(f) is not None}
    if report["kind"] == "quantlm":  # its own bits and group (this_model was the FloatLM's 16-bit count)
        from spectra.accounting import quantlm_bits, size_in_bits
        from spectra.ptq.formats import quantlm_size_bits, read_quant_config

        qcfg = read_quant_config(path)
        report["bits"]["this_model"] = size_in_bits(cfg, quantlm_bits(qcfg["bits"], qcfg["group_size"]))
        report["actual"] = quantlm_size_bits(path)
    elif report["kind"] == "packed":
        from spectra.accounting import stored_bits

        report["actual"] = stored_bits(path)
    report["path"] = str(path)
    return report


def run_info(args: argparse.Namespace) -> int:
    from spectra.config import size_names

    if args.sizes or not args.model:
        print("\n".join(size_names()))
        return 0
    report = model_info(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report.get('name') or report.get('path')}  family={report['family']}")
    print(f"  params              {report['params']:>16,}")
    print(f"  non-embedding       {report['non_embedding_params']:>16,}")
    print("  size in bits (paper's accounting; embeddings and head at 16 bits):")
    for family, bits in report["bits"].items():
        print(f"    {family:<16}{bits / 1e9:>10.3f}e9 bits  {bits / 8 / 2**20:>10.1f} MiB")
    for name, size in report.get("files", {}).items():
        print(f"  {name:<20}{size:>16,} bytes, header and size checked")
    if "actual" in report:
        print(f"  this checkpoint     {json.dumps(report['actual'])}")
    return 0


def run_export_hf(args: argparse.Namespace) -> int:
    from spectra.files import refuse_replacing_source
    from spectra.interop.hf import export_hf
    from spectra.loading import find_tokenizer, load

    refuse_replacing_source(args.out_dir, args.src)
    export_hf(load(args.src), args.out_dir, dtype=args.dtype, tokenizer=find_tokenizer(args.src))
    print(f"wrote {args.out_dir}")
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    from spectra.files import check_output_file
    from spectra.interop.gguf import export_gguf
    from spectra.loading import find_tokenizer, load, model_dir

    src, out = Path(args.src), Path(args.out)
    if src.is_dir() and out.exists() and model_dir(src).resolve() in out.resolve().parents:
        raise ValueError(f"OUT {out} is a file of the input model {args.src}: writing it would destroy the input; "
                         "choose another output file")
    check_output_file(out, "OUT")  # before loading: a folder failed after the export, naming a temporary file
    result = export_gguf(load(args.src), args.out, qtype=args.type, lossy=args.lossy,
                         tokenizer=find_tokenizer(args.src))
    print(json.dumps(result, indent=2, default=str))
    return 0
