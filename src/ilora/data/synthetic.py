"""A synthetic sequential-recommendation dataset with real sequential signal.

`make_synthetic` is deterministic for a seed. The generative story:

* Items fall into ``genres`` clusters (default ``min(20, items // 5)``). Each item has a Zipf-like popularity
  (weight ``1 / rank ** 0.8``, ranks shuffled) and, inside its genre, one fixed successor
  (genre members form a random cycle).
* Titles are readable and unique ("Velvet Harbor", "The Crimson Owls"): an adjective
  from the genre's own few adjectives plus a noun, so titles of one genre share words.
* Each user has a taste over genres (Dirichlet(0.3)) and ``T`` interactions,
  uniform in ``[min_interactions, max_interactions]``. The first item is drawn from a
  genre of the user's taste (by popularity inside the genre). Each next item is, with
  probability ``follow``, the successor of the last item; with ``stay``, another item of
  the last item's genre (by popularity); otherwise it is drawn afresh from the taste.

So the next item depends strongly on the last one (a last-item transition model beats
popularity by far), and user taste adds a longer-range signal. The per-user sequences
are split with `ilora.data.interactions.sequences_to_splits` (leave-one-out plus sliding
windows of at most ``max_len`` items), exactly like real interaction logs.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from ilora.config import option
from ilora.data.dataset import Catalog, SeqDataset
from ilora.data.interactions import sequences_to_splits
from ilora.errors import ConfigError

ADJECTIVES = (
    "Velvet", "Crimson", "Silver", "Golden", "Midnight", "Electric", "Quiet", "Wild", "Hollow", "Neon",
    "Amber", "Scarlet", "Frozen", "Burning", "Lonely", "Painted", "Broken", "Distant", "Gentle", "Hidden",
    "Iron", "Jade", "Lunar", "Solar", "Marble", "Misty", "Northern", "Southern", "Paper", "Rusty",
    "Sapphire", "Silent", "Stone", "Sunny", "Twilight", "Violet", "Wandering", "Wooden", "Cosmic", "Copper",
    "Desert", "Emerald", "Glass", "Indigo", "Ivory", "Mellow", "Obsidian", "Restless",
)  # fmt: skip
NOUNS = (
    "Harbor", "Owl", "River", "Lantern", "Garden", "Falcon", "Mirror", "Engine", "Voyager", "Ember",
    "Signal", "Meadow", "Comet", "Tower", "Anchor", "Shadow", "Dream", "Road", "Orchard", "Ranger",
    "Sparrow", "Window", "Island", "Lion", "Rocket", "Planet", "Forest", "Mountain", "Castle", "Bridge",
    "Dancer", "Drifter", "Pilot", "Sailor", "Knight", "Horizon", "Canyon", "Raven", "Tiger", "Valley",
    "Crystal", "Circuit", "Feather", "Harvest", "Hunter", "Monarch", "Piano", "Satellite", "Tide", "Star",
)  # fmt: skip


@dataclass
class SynthConfig:
    """Options of `make_synthetic` (``ilora data synth``)."""

    users: int = option(1000, "number of users")
    items: int = option(500, "number of items")
    seed: int = option(0, "random seed; the same seed gives the same dataset")
    max_len: int = option(10, "history window: at most this many previous items per sample")
    genres: int = option(0, "number of item clusters (genres); 0 picks min(20, items // 5), at least 1")
    min_interactions: int = option(5, "fewest interactions per user")
    max_interactions: int = option(30, "most interactions per user")
    follow: float = option(0.6, "probability that the next item is the last item's fixed successor")
    stay: float = option(0.25, "probability that the next item is another item of the last item's genre")


def _check(cfg: SynthConfig) -> None:
    if cfg.users < 1 or cfg.items < 2:
        raise ConfigError(f"need users >= 1 and items >= 2 (got users={cfg.users}, items={cfg.items})")
    if not 0 <= cfg.genres <= cfg.items:
        raise ConfigError(f"genres must be in 0..items (got {cfg.genres}; 0 picks a default)")
    if not 2 <= cfg.min_interactions <= cfg.max_interactions:
        raise ConfigError(
            f"need 2 <= min_interactions <= max_interactions (got {cfg.min_interactions}, {cfg.max_interactions})"
        )
    if cfg.follow < 0 or cfg.stay < 0 or cfg.follow + cfg.stay > 1:
        raise ConfigError(f"follow and stay must be >= 0 with follow + stay <= 1 (got {cfg.follow}, {cfg.stay})")
    if cfg.max_len < 1:
        raise ConfigError(f"max_len must be >= 1 (got {cfg.max_len})")
    if cfg.seed < 0:
        raise ConfigError(f"seed must be >= 0 (got {cfg.seed})")


def _unique(title: str, used: set[str]) -> str:
    candidate, k = title, 2
    while candidate in used:
        candidate, k = f"{title} {k}", k + 1
    used.add(candidate)
    return candidate


def make_titles(genre: np.ndarray, genres: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Unique readable titles; items of one genre draw from that genre's adjectives."""
    titles: list[str] = [""] * len(genre)
    used: set[str] = set()
    for g in range(genres):
        adjectives = ADJECTIVES[g :: genres] if genres <= len(ADJECTIVES) else (ADJECTIVES[g % len(ADJECTIVES)],)
        pool = [f"{a} {n}" for a in adjectives for n in NOUNS] + [f"The {a} {n}s" for a in adjectives for n in NOUNS]
        members = np.flatnonzero(genre == g)
        picks = rng.permutation(len(pool))
        for k, item in enumerate(members):
            titles[item] = _unique(pool[picks[k % len(pool)]], used)
    return tuple(titles)


def _cumulative(weights: np.ndarray) -> list[float]:
    total = np.cumsum(weights)
    return (total / total[-1]).tolist()


def generate_sequences(cfg: SynthConfig) -> tuple[tuple[str, ...], list[list[int]]]:
    """Titles and one time-ordered item sequence per user (the story in the module docstring)."""
    _check(cfg)
    if cfg.genres == 0:
        cfg = dataclasses.replace(cfg, genres=max(1, min(20, cfg.items // 5)))
    rng = np.random.default_rng(cfg.seed)
    genre = rng.permutation(cfg.items) % cfg.genres
    popularity = 1.0 / (rng.permutation(cfg.items) + 1.0) ** 0.8
    members = [np.flatnonzero(genre == g) for g in range(cfg.genres)]
    successor = np.empty(cfg.items, dtype=np.int64)
    for group in members:
        cycle = rng.permutation(group)
        successor[cycle] = np.roll(cycle, -1)
    in_genre = [_cumulative(popularity[group]) for group in members]
    titles = make_titles(genre, cfg.genres, rng)

    def draw(g: int, u: float) -> int:
        return int(members[g][min(bisect_right(in_genre[g], u), len(members[g]) - 1)])

    sequences = []
    for _ in range(cfg.users):
        taste = _cumulative(rng.dirichlet(np.full(cfg.genres, 0.3)) + 1e-12)
        length = int(rng.integers(cfg.min_interactions, cfg.max_interactions + 1))
        choice, u_genre, u_item = rng.random(length), rng.random(length), rng.random(length)
        g = min(bisect_right(taste, u_genre[0]), cfg.genres - 1)
        sequence = [draw(g, u_item[0])]
        for step in range(1, length):
            last = sequence[-1]
            if choice[step] < cfg.follow:
                sequence.append(int(successor[last]))
            elif choice[step] < cfg.follow + cfg.stay:
                sequence.append(draw(int(genre[last]), u_item[step]))
            else:
                g = min(bisect_right(taste, u_genre[step]), cfg.genres - 1)
                sequence.append(draw(g, u_item[step]))
        sequences.append(sequence)
    return titles, sequences


def make_synthetic(
    users: int = 1000, items: int = 500, seed: int = 0, max_len: int = 10, **options: float | int
) -> SeqDataset:
    """A deterministic synthetic `SeqDataset`; ``options`` are the other `SynthConfig` fields."""
    return synthetic_from_config(SynthConfig(users=users, items=items, seed=seed, max_len=max_len, **options))  # type: ignore[arg-type]


def synthetic_from_config(cfg: SynthConfig) -> SeqDataset:
    titles, sequences = generate_sequences(cfg)
    splits = sequences_to_splits(sequences, num_items=cfg.items, max_len=cfg.max_len)
    counts = {name: {"rows_in_source": len(s), "dropped_no_history": 0} for name, s in splits.items()}
    source = f"synthetic(users={cfg.users}, items={cfg.items}, seed={cfg.seed})"
    info = {"format": "synthetic", "users": cfg.users, "splits": counts}
    return SeqDataset(Catalog(titles), dict(splits), source=source, load_info=info)
