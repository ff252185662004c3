"""`loradrop montage JOB`: one prompt's samples over the training steps, as an animated image to share."""

from __future__ import annotations

FORMATS = {".webp": "WEBP", ".gif": "GIF", ".png": "PNG", ".mp4": "mp4"}
HOLD_LAST = 3  # the last frame (the finished LoRA) stays on screen this many frames long


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "montage",
        help="a job's samples of one prompt over the steps, as an animated WebP/GIF (or mp4)",
        description=(
            "Fetch a job's samples of one prompt from the daemon (which may run on another machine) and write them, "
            "oldest step first and captioned with the step, as an animation: animated WebP, GIF or PNG by the file's "
            "suffix, or mp4 when ffmpeg is installed."
        ),
    )
    p.add_argument("job", help="the job's id or number")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file: .webp, .gif, .png (animated) or .mp4 (default: JOB-montage.webp)",
    )
    p.add_argument(
        "--prompt",
        type=int,
        default=0,
        metavar="N",
        help="which sample prompt, by its index (0: the first; default: 0)",
    )
    p.add_argument("--fps", type=float, default=4.0, metavar="F", help="frames per second (default: 4)")
    p.add_argument(
        "--size",
        type=int,
        default=512,
        metavar="PX",
        help="longest side of a frame in pixels, 0 for the samples' own size (default: 512)",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from loradrop.errors import UserError
    from loradrop.proto.client import Client
    from loradrop.tui.samples import SampleIndex

    if args.fps <= 0:
        raise UserError(f"--fps must be more than 0, not {args.fps}.")
    if args.size < 0:
        raise UserError(f"--size must be 0 (the samples' own size) or more, not {args.size}.")
    with Client.from_args(args) as daemon:
        job = daemon.job(args.job)
        output = Path(args.output or f"{job.id}-montage.webp").expanduser()
        if output.suffix.lower() not in FORMATS:
            raise UserError(f"{output} has no known suffix; name a .webp, .gif, .png or .mp4 file.")
        index = SampleIndex()
        for event in daemon.events(job.id, follow=False):
            index.add(event)
        if not index.prompts:
            raise UserError(
                f"job {job.id} has no samples yet; set sample_every_n_steps and a sample-prompts.txt to get them."
            )
        if args.prompt not in index.prompts:
            raise UserError(
                f"job {job.id} has no samples of prompt {args.prompt}; its prompts are {', '.join(map(str, index.prompts))}."
            )
        series = index.series(args.prompt)
        frames = [_frame(daemon.sample(s.path, max_size=args.size).png, f"step {s.step}") for s in series]
    write_animation(frames, output, args.fps)
    print(f"{output}  ({len(frames)} frames, prompt {args.prompt}: {index.prompt(args.prompt)})")
    return 0


def _frame(png: bytes, caption: str):
    """The sample with its step written in a bar below it."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    image = Image.open(io.BytesIO(png)).convert("RGB")
    bar = max(14, image.height // 12)
    frame = Image.new("RGB", (image.width, image.height + bar), (0, 0, 0))
    frame.paste(image, (0, 0))
    font = ImageFont.load_default(size=int(bar * 0.75))
    ImageDraw.Draw(frame).text(
        (4, image.height + bar // 2), caption, fill=(255, 255, 255), font=font, anchor="lm"
    )
    return frame


def write_animation(frames: list, output, fps: float) -> None:
    """Write the frames (PIL images) as an animation chosen by `output`'s suffix, atomically."""
    from loradrop.fsutil import atomic_path

    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    fmt = FORMATS[output.suffix.lower()]
    step_ms = round(1000 / fps)
    durations = [step_ms] * (len(frames) - 1) + [step_ms * HOLD_LAST]
    if fmt == "mp4":
        _write_mp4(frames, output, fps)
        return
    with atomic_path(output) as tmp:
        frames[0].save(
            tmp,
            format=fmt,
            save_all=True,
            append_images=frames[1:],
            duration=durations,
            loop=0,
            **({"quality": 90} if fmt == "WEBP" else {}),
        )


def _write_mp4(frames: list, output, fps: float) -> None:
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from loradrop.errors import UserError
    from loradrop.fsutil import atomic_path

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise UserError(
            f"writing {output} needs ffmpeg, which is not installed; install it, or name a .webp or .gif file instead."
        )
    frames = frames + [frames[-1]] * (HOLD_LAST - 1)
    with tempfile.TemporaryDirectory() as folder, atomic_path(output) as tmp:
        for i, frame in enumerate(frames):
            frame.save(Path(folder) / f"{i:05d}.png")
        command = [
            ffmpeg,
            "-y",
            "-loglevel",
            "error",
            "-framerate",
            f"{fps:g}",
            "-i",
            str(Path(folder) / "%05d.png"),
        ]
        # yuv420p (what every player takes) needs even sides
        command += [
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-f",
            "mp4",
            str(tmp),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(
                f"ffmpeg could not write {output}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            )
