"""Rebuild `lightning-benchmark.parquet`: the six benchmark prompts and seeds from the
"SDXL-Lightning: quick look and comparison" article, each with its article seed plus three more.

Run: `.venv/bin/python configs/manifests/build_example.py`
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ARTICLE_PROMPTS = [
    ("food", "food photography, cheesecake, blueberries and jam, cinnamon, in a luxurious Michelin kitchen style, depth of field, ultra detailed, natural features", 78934567),
    ("portrait", "close up, woman, headdress, neon iridescent tattoos, snow forest, intricate, 8k, cinematic lighting, volumetric lighting, 8k", 55986344589),
    ("animal", "a fish made out of dendrobium flowers, ultrarealistic, highly detailed, 8k", 501798843),
    ("macro", "macro photography of beautiful nails with manicure, painting, oil paints, gold splashes, professional color palette", 1963386471),
    ("text", 'video game room with a big neon sign that says "arcade", cinematic, 8k, natural lighting, HDR, high resolution, shot on IMAX Laser', 1138562738),
    ("3d", "3d isometric dungeon game", 3812179903),
]  # fmt: skip
EXTRA_SEEDS = (1, 42, 2024)


def main() -> None:
    rows = []
    for category, prompt, seed in ARTICLE_PROMPTS:
        for s in (seed, *EXTRA_SEEDS):
            rows.append(
                {"id": f"{category}-{s}", "prompt": prompt, "seed": s, "category": category, "article_seed": s == seed}
            )
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, Path(__file__).with_name("lightning-benchmark.parquet"))


if __name__ == "__main__":
    main()
