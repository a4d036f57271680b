"""k-means visual tokenizers: fit a codebook, assign tokens to a file list, show usage.

    # fit (one process): sample patch features, faiss k-means, save the codebook
    python launch/tokens.py fit --filelist train.txt --extractor clip --clip-model RN50x64 \
        --clip-weights /weights/RN50x64.pt --img-size 224 --patch-size 16 --k 8192 \
        --niter 20 --nredo 5 --out tokenizers/kclip.pt
    # assign (one or many processes: torchrun --nproc_per_node 8 launch/tokens.py assign ...)
    python launch/tokens.py assign --filelist train.txt --codebook tokenizers/kclip.pt --out tokens/train
    python launch/tokens.py stats --store tokens/train
    # the same, then the list + its tokens as webdataset shards (data.train_shards=shards/train)
    python launch/tokens.py assign --filelist train.txt --codebook tokenizers/kclip.pt --out tokens/train \
        --shards-out shards/train --shard-size 1GB

``assign`` is resumable: rerun the same command after a kill and only unfinished
chunks are redone. With several processes (RANK/WORLD_SIZE set, e.g. by torchrun)
each rank tokenises its own chunks of the one store.
"""

from __future__ import annotations

import argparse
import json
import os


def _guard(a: argparse.Namespace):
    """What fit / assign read, so --out can never name one of them."""
    from mapet_ds.safe_io import InputGuard

    guard = InputGuard().add(a.filelist, "the file list")
    if a.clip_weights and os.path.exists(a.clip_weights):
        guard.add(a.clip_weights, "the CLIP weights")
    return guard


def cmd_fit(a: argparse.Namespace) -> None:
    from mapet_ds.filelist import read_filelist
    from mapet_ds.safe_io import UnsafeWriteError
    from mapet_ds.tokenizers import (
        ClipExtractor,
        Codebook,
        PixelPatchExtractor,
        code_usage,
        fit_codebook,
        format_usage,
        sample_features,
    )
    from mapet_ds.tokenizers.codebook import codebook_meta, faiss_cpu_fallback_note

    if int(os.environ.get("RANK", 0)) != 0:
        print("[fit] runs in one process: rank > 0 has nothing to do")
        return
    filelist = read_filelist(a.filelist, root=a.root)
    _guard(a).add_files(filelist.abspaths(), "an image of the list").check(a.out)
    if os.path.isdir(a.out):
        raise UnsafeWriteError(f"--out {a.out} is a folder: --out names the codebook file to write, "
                               f"e.g. {os.path.join(a.out, 'codebook.pt')}")
    use_gpu = a.faiss_gpu
    if use_gpu == "auto" and (note := faiss_cpu_fallback_note()) is not None:
        print(f"[fit] note: {note}", flush=True)  # before the (long) sampling and fit, not after
        use_gpu = False
    if a.img_size % a.patch_size:
        raise SystemExit(f"--img-size {a.img_size} must be a multiple of --patch-size {a.patch_size}")
    grid = a.img_size // a.patch_size
    if a.extractor == "pixel":
        extractor = PixelPatchExtractor(a.patch_size, a.img_size, norm=a.pixel_norm, device=a.device)
    else:
        if not a.clip_weights:
            raise SystemExit("--extractor clip needs --clip-weights (a local file, or an open_clip tag such as 'openai')")
        extractor = ClipExtractor(a.clip_model, a.clip_weights, a.clip_input_size, grid, device=a.device)
    print(f"[fit] extractor {json.dumps(extractor.spec())}", flush=True)
    feats, info = sample_features(
        extractor, filelist, a.k, max_points_per_centroid=a.max_points_per_centroid,
        images_fraction=a.images_fraction, patches_per_image=a.patches_per_image, seed=a.seed,
        batch_size=a.batch_size, num_threads=a.num_threads,
    )
    print(f"[fit] {info['num_vectors']:,} vectors x {feats.shape[1]} dims from {info['images_used']:,} images "
          f"({'-'.join(map(str, sorted(set(info['patches_per_image']))))} patches each); {feats.nbytes / 2**30:.2f} GiB", flush=True)
    centroids, stats = fit_codebook(
        feats, a.k, niter=a.niter, nredo=a.nredo, seed=a.kmeans_seed, max_points_per_centroid=a.max_points_per_centroid,
        spherical=a.spherical, use_gpu=use_gpu, verbose=a.verbose, return_stats=True,
    )
    kmeans = {"niter": a.niter, "nredo": a.nredo, "seed": a.kmeans_seed, "sample_seed": a.seed, "max_points_per_centroid": a.max_points_per_centroid,
              "spherical": a.spherical, "gpu": stats["gpu"], "objective": stats["objective"], "seconds": stats["seconds"]}
    codebook = Codebook(centroids, codebook_meta(extractor.spec(), info, kmeans))
    codebook.save(a.out)
    print(f"[fit] k-means {stats['seconds']:.1f}s (faiss {'GPU' if stats['gpu'] else 'CPU'}), objective "
          f"{stats['objective']:.4g}; codebook -> {a.out}")
    print("[fit] on the fitting sample:\n" + format_usage(code_usage(codebook.assign(feats), a.k)))


def cmd_assign(a: argparse.Namespace) -> None:
    from mapet_ds.filelist import read_filelist
    from mapet_ds.safe_io import out_folder
    from mapet_ds.tokenizers import (
        Codebook,
        KMeansTokenizer,
        assign_tokens,
        build_extractor,
        code_usage,
        format_usage,
    )

    filelist = read_filelist(a.filelist, root=a.root)
    guard = _guard(a).add(a.codebook, "the codebook").add_files(filelist.abspaths(), "an image of the list")
    out_folder(a.out, guard, create=False)
    guard.check_folder(a.out, ["meta.json", "tokens.npy", "progress"])
    codebook = Codebook.load(a.codebook)
    extractor = build_extractor(codebook.meta["extractor"], clip_weights=a.clip_weights, device=a.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    store = assign_tokens(
        filelist, KMeansTokenizer(extractor, codebook, a.codebook), a.out, batch_size=a.batch_size, chunk_size=a.chunk_size,
        rank=rank, world_size=world, num_threads=a.num_threads,
    )
    if store.complete:
        print(f"[assign] token store {a.out}: {store.num_images:,} x {store.grid}x{store.grid} tokens, complete")
        print(format_usage(code_usage(store.tokens, store.vocab)))
    if a.shards_out and rank == 0:
        _write_shards(a, filelist, store)
    else:
        left = store.num_chunks - len(store.done_chunks())
        print(f"[assign] rank {rank} done; {left} chunk(s) still being written by other ranks")


def _write_shards(a: argparse.Namespace, filelist, store) -> None:
    """``assign --shards-out DIR``: rank 0 waits for every rank's chunks, then packs the
    list with its tokens into webdataset shards (data/make_shards.py, resumable)."""
    import importlib.util
    import sys
    import time
    from pathlib import Path

    t0 = time.monotonic()
    while not store.complete:
        if time.monotonic() - t0 > 3600:
            raise SystemExit(f"error: token store {a.out} still incomplete after 1 h: rerun assign to finish it")
        time.sleep(2.0)
    store.finalise()
    path = Path(__file__).resolve().parents[1] / "data" / "make_shards.py"
    spec = importlib.util.spec_from_file_location("mapet_data_make_shards", path)
    ms = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ms  # its worker processes unpickle functions from it
    spec.loader.exec_module(ms)
    try:
        m = ms.make_shards(filelist.list_path, a.shards_out, root=a.root, token_store=a.out,
                           shard_size=ms.parse_size(a.shard_size), workers=a.num_threads, progress=True)
    except (ms.ShardMakeError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"[assign] {m['num_samples']:,} samples with their tokens in {len(m['shards'])} shard(s) under "
          f"{a.shards_out} (tokenizer {m['tokenizer']['fingerprint'][:12]}, {m['num_dropped']} dropped by the check)")


def cmd_stats(a: argparse.Namespace) -> None:
    from mapet_ds.filelist import read_filelist
    from mapet_ds.tokenizers import TokenStore, code_usage, format_usage

    filelist = read_filelist(a.filelist, root=a.root) if a.filelist else None
    store = TokenStore.open(a.store, filelist=filelist, allow_incomplete=True)
    rows = store.complete_rows()
    print(f"token store {a.store}: {store.num_images:,} images, grid {store.grid}, vocab {store.vocab}, "
          f"{int(rows.sum()):,} rows complete")
    usage = code_usage(store.tokens[rows], store.vocab, top=a.top)
    print(json.dumps(usage) if a.json else format_usage(usage))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--filelist", required=True, help="file list (data/make_filelist.py)")
        sp.add_argument("--root", default=None, help="image root (default: the list's directory)")
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--num-threads", type=int, default=4, help="loader threads per process")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
        sp.add_argument("--clip-weights", default=None, help="CLIP weights file (or open_clip tag)")

    f = sub.add_parser("fit", help="sample features and fit a k-means codebook")
    common(f)
    f.add_argument("--extractor", choices=["pixel", "clip"], default="pixel")
    # luma by default: per-patch normalised luma gives structure tokens (a flat patch of any
    # colour is one code); "patch" is what codebooks made before the option used.
    f.add_argument("--pixel-norm", choices=["luma", "channel", "patch"], default="luma",
                   help="pixel extractor: normalise each patch's luma (structure tokens), each channel, or all "
                        "3 channels together (keeps hue; older codebooks). Default luma")
    f.add_argument("--clip-model", default="RN50x64", help="open_clip model name")
    f.add_argument("--clip-input-size", type=int, default=None, help="CLIP input px (default: the model's; RN50x64: 448)")
    f.add_argument("--img-size", type=int, default=224, help="ViT input size")
    f.add_argument("--patch-size", type=int, default=16, help="ViT patch size (grid = img-size / patch-size)")
    # Defaults = the release's k-means (k 8192, 20 iterations, best of 5 runs, <= 512 points per centroid).
    f.add_argument("--k", type=int, default=8192)
    f.add_argument("--max-points-per-centroid", type=int, default=512)
    f.add_argument("--images-fraction", type=float, default=1.0, help="fraction of the list's images to sample from")
    f.add_argument("--patches-per-image", type=int, default=None, help="default: spread the cap over all sampled images")
    f.add_argument("--niter", type=int, default=20)
    f.add_argument("--nredo", type=int, default=5, help="k-means runs, best kept (release: 5)")
    f.add_argument("--seed", type=int, default=0, help="seed of the feature sample (which images and patches)")
    f.add_argument("--kmeans-seed", type=int, default=1234, help="faiss k-means seed (default 1234: faiss's own, as the release)")
    f.add_argument("--spherical", action="store_true")
    f.add_argument("--faiss-gpu", default="auto", type=lambda s: s if s == "auto" else s.lower() in ("1", "true", "yes"))
    f.add_argument("--verbose", action="store_true", help="faiss k-means progress")
    f.add_argument("--out", required=True, help="codebook file to write")
    f.set_defaults(fn=cmd_fit)

    s = sub.add_parser("assign", help="tokenise a file list into a token store (resumable, multi-rank)")
    common(s)
    s.add_argument("--codebook", required=True)
    s.add_argument("--chunk-size", type=int, default=4096, help="images per resumable chunk")
    s.add_argument("--out", required=True, help="token store directory")
    s.add_argument("--shards-out", default=None, help="also pack the list + tokens into webdataset shards here "
                                                      "(data/make_shards.py; train with data.train_shards)")
    s.add_argument("--shard-size", default="1GB", help="with --shards-out: bytes per shard, e.g. 1GB")
    s.set_defaults(fn=cmd_assign)

    t = sub.add_parser("stats", help="codebook usage of a token store")
    t.add_argument("--store", required=True)
    t.add_argument("--filelist", default=None)
    t.add_argument("--root", default=None)
    t.add_argument("--top", type=int, default=5)
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_stats)

    for sp in sub.choices.values():
        sp.add_argument("--print-config", action="store_true",
                        help="print the resolved arguments (flags + defaults) as YAML and exit; reads no data "
                             "(tokens.py takes no recipe)")
    a = p.parse_args(argv)
    if a.print_config:
        import yaml

        print(yaml.safe_dump({"command": a.cmd, **{k: v for k, v in vars(a).items()
                                                   if k not in ("fn", "cmd", "print_config")}}, sort_keys=False),
              end="")
        return
    from mapet_ds.engine.errors import run_main
    from mapet_ds.filelist import FileListError
    from mapet_ds.pipelines.common import PipelineRunError
    from mapet_ds.safe_io import UnsafeWriteError
    from mapet_ds.tokenizers import CodebookError, FeatureError, TokenStoreError

    # one `error:` line per job (not per rank) and exit code 2, as the training launchers
    # (an OSError naming a file is one line too; other errors point to a traceback file)
    code = run_main(lambda: a.fn(a), (FileListError, CodebookError, FeatureError, TokenStoreError,
                                      UnsafeWriteError, PipelineRunError))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
