"""An embedded, beauty-like synthetic dataset: no download, deterministic by seed, generated in a second.

What is planted (and therefore what a good re-ranker can learn, and what a reasoning trace can say):

* **Routines (complements).** Each product line is a routine of categories bought in order, e.g.
  Cleansers -> Toners -> Serums -> Moisturizers -> Sunscreens. A user on step k of a routine most often buys step k+1 next.
* **Brand loyalty.** Each user prefers one or two brands and buys them most of the time.
* **Popularity.** Within a (brand, category) the items follow a Zipf law, and some purchases are random popular items.

An item-to-item retriever sees these only through sparse item co-occurrence; a model that reads the categories and
brands written in the prompt can do better. That gap is what the re-ranker is for.
"""
from __future__ import annotations

import numpy as np

from .catalog import Catalog, InteractionData

ROUTINES: dict[str, list[str]] = {
    "Skin Care": ["Cleansers", "Toners", "Serums", "Moisturizers", "Sunscreens"],
    "Hair Care": ["Shampoos", "Conditioners", "Hair Masks", "Styling Products"],
    "Makeup": ["Primers", "Foundations", "Concealers", "Powders", "Lipsticks"],
    "Nails": ["Base Coats", "Nail Polish", "Top Coats", "Nail Polish Removers"],
    "Bath & Body": ["Body Wash", "Body Scrubs", "Body Lotions"],
}
BRANDS = ["Aurelia", "Bloomwell", "Cerise", "Dewline", "Elmsley", "Fjord", "Glacea", "Halcyon", "Iris Lane",
          "Juniper", "Kalos", "Lumen", "Mireille", "Nacre", "Orrin", "Petalia", "Quill", "Rosaline", "Sable",
          "Tessaly", "Umbra", "Velour", "Wren", "Yarrow"]
ADJECTIVES = ["hydrating", "gentle", "radiant", "matte", "daily", "repair", "velvet", "clear", "volume", "silk",
              "fresh", "rich", "light", "pure", "glow", "calming"]
SIZES = ["1 oz", "2 oz", "4 oz", "8 oz", "0.5 fl oz", "mini"]


def generate_synthetic(n_users: int = 3000, n_items: int = 400, seed: int = 0,
                       p_next_step: float = 0.65, p_brand: float = 0.75, p_random: float = 0.15,
                       mean_extra_length: float = 4.0) -> InteractionData:
    """Generate a catalogue of about ``n_items`` items and ``n_users`` users with at least 5 purchases each."""
    rng = np.random.default_rng(seed)
    domains = list(ROUTINES)
    # each brand sells in one or two domains
    brand_domains = {b: sorted(rng.choice(len(domains), size=rng.integers(1, 3), replace=False).tolist())
                     for b in BRANDS}
    slots = [(b, d, c) for b in BRANDS for d in brand_domains[b] for c in ROUTINES[domains[d]]]
    per_slot = max(1, round(n_items / len(slots)))
    titles, brands, cats, slot_of = [], [], [], []
    for s, (b, d, c) in enumerate(slots):
        for _ in range(per_slot):
            adj = rng.choice(ADJECTIVES, size=2, replace=False)
            titles.append(f"{b} {adj[0].title()} {adj[1].title()} {c.rstrip('s')} {rng.choice(SIZES)}")
            brands.append(b)
            cats.append([domains[d], c])
            slot_of.append(s)
    n = len(titles)
    slot_of = np.array(slot_of)
    popularity = rng.zipf(1.6, size=n).clip(max=50).astype(float)
    popularity /= popularity.sum()
    by_slot: dict[tuple[str, str], np.ndarray] = {}
    for i in range(n):
        by_slot.setdefault((brands[i], cats[i][1]), []).append(i)
    by_slot = {k: np.array(v) for k, v in by_slot.items()}
    by_cat: dict[str, np.ndarray] = {}
    for i in range(n):
        by_cat.setdefault(cats[i][1], []).append(i)
    by_cat = {k: np.array(v) for k, v in by_cat.items()}

    def pick(pool: np.ndarray) -> int:
        p = popularity[pool] / popularity[pool].sum()
        return int(rng.choice(pool, p=p))

    sequences, user_ids = [], []
    for u in range(n_users):
        dom = [domains[int(rng.integers(len(domains)))]]
        if rng.random() < 0.4:
            dom.append(domains[int(rng.integers(len(domains)))])
        fav = [b for b in BRANDS if any(domains[d] in dom for d in brand_domains[b])]
        fav = list(rng.choice(fav, size=min(len(fav), int(rng.integers(1, 3))), replace=False))
        length = 5 + int(rng.poisson(mean_extra_length))
        cur_dom, step = dom[0], int(rng.integers(len(ROUTINES[dom[0]])))
        seq: list[int] = []
        for _ in range(length * 3):
            if len(seq) >= length:
                break
            r = rng.random()
            if r < p_random:
                item = int(rng.choice(n, p=popularity))
            else:
                if r < p_random + p_next_step:
                    step = (step + 1) % len(ROUTINES[cur_dom])
                else:
                    cur_dom = dom[int(rng.integers(len(dom)))]
                    step = int(rng.integers(len(ROUTINES[cur_dom])))
                cat = ROUTINES[cur_dom][step]
                brand_pool = [b for b in fav if (b, cat) in by_slot]
                if brand_pool and rng.random() < p_brand:
                    item = pick(by_slot[(brand_pool[int(rng.integers(len(brand_pool)))], cat)])
                else:
                    item = pick(by_cat[cat])
            if item not in seq:                      # like the 5-core data: no repeats within a user
                seq.append(item)
        if len(seq) >= 5:
            sequences.append(seq)
            user_ids.append(f"U{u:05d}")
    catalog = Catalog(item_ids=[f"S{i:04d}" for i in range(n)], titles=titles, brands=brands, categories=cats)
    return InteractionData(name="synthetic", catalog=catalog, user_ids=user_ids, sequences=sequences,
                           info={"source": "generated", "seed": seed, "routines": ROUTINES,
                                 "p_next_step": p_next_step, "p_brand": p_brand, "p_random": p_random})
