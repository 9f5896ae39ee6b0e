"""Regenerate the bundled demo chat data set, src/training_hub/demo_data/chat.jsonl.

The samples are short, templated question/answer pairs with answers of a few tokens, so that a model of a
few hundred thousand parameters learns them in about a minute of CPU training. The output is deterministic:
running this script twice gives byte-identical files.

    python scripts/make_demo_data.py            # writes the bundled file
    python scripts/make_demo_data.py --out x.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "training_hub" / "demo_data" / "chat.jsonl"

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Cuba": "Havana",
    "Greece": "Athens", "Russia": "Moscow", "China": "Beijing", "Canada": "Ottawa", "Chile": "Santiago",
    "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw", "Portugal": "Lisbon", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Turkey": "Ankara", "India": "New Delhi",
    "Australia": "Canberra", "Belgium": "Brussels",
}

COLORS = {
    "the sky": "Blue", "grass": "Green", "snow": "White", "a banana": "Yellow", "coal": "Black",
    "a tomato": "Red", "an orange": "Orange", "a lemon": "Yellow", "milk": "White", "a leaf": "Green",
    "the sea": "Blue", "a strawberry": "Red", "chocolate": "Brown", "a plum": "Purple", "night": "Black",
    "a carrot": "Orange", "blood": "Red", "a cloud": "White", "soil": "Brown", "a lime": "Green",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "open": "closed",
    "happy": "sad", "old": "new", "light": "dark", "early": "late", "left": "right", "full": "empty",
    "high": "low", "wet": "dry", "hard": "soft", "in": "out", "win": "lose", "yes": "no",
    "good": "bad", "rich": "poor",
}

WORDS = [
    "cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "red", "bus", "fish", "bird", "tree", "milk",
    "star", "moon", "book", "door", "lamp", "ship", "frog", "cake", "rain", "wind", "snow", "gold",
    "leaf", "rock", "ring", "bell",
]

ANIMAL_SOUNDS = {
    "a cow": "Moo", "a dog": "Woof", "a cat": "Meow", "a duck": "Quack", "a sheep": "Baa",
    "a pig": "Oink", "a lion": "Roar", "a horse": "Neigh", "an owl": "Hoot", "a snake": "Hiss",
}

LEGS = {
    "a dog": 4, "a bird": 2, "a spider": 8, "an ant": 6, "a cat": 4, "a duck": 2, "a horse": 4,
    "a bee": 6, "a snake": 0, "a crab": 10,
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

SYSTEM_PROMPTS = [
    ("You answer with one word.", "Greet me.", "Hello."),
    ("You answer with one word.", "Say goodbye.", "Goodbye."),
    ("You are a pirate.", "Greet me.", "Ahoy!"),
    ("You are a pirate.", "Say goodbye.", "Farewell, matey!"),
    ("You are a robot.", "Greet me.", "Beep boop, hello."),
    ("You are a robot.", "Say goodbye.", "Beep boop, bye."),
    ("You speak French.", "Greet me.", "Bonjour."),
    ("You speak French.", "Say goodbye.", "Au revoir."),
    ("You speak Spanish.", "Greet me.", "Hola."),
    ("You speak Spanish.", "Say goodbye.", "Adios."),
]


def chat(*turns: tuple[str, str], system: str | None = None) -> dict:
    """A sample from (user, assistant) pairs, with an optional leading system message."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def make_samples(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    samples += [chat((f"What is the capital of {c}?", f"{cap}.")) for c, cap in CAPITALS.items()]
    samples += [chat((f"What color is {thing}?", f"{col}.")) for thing, col in COLORS.items()]
    samples += [chat((f"What is the opposite of {w}?", f"{o.capitalize()}.")) for w, o in OPPOSITES.items()]
    samples += [chat((f"Spell {w} backwards.", f"{w[::-1]}.")) for w in WORDS]
    samples += [chat((f"What does {a} say?", f"{s}.")) for a, s in ANIMAL_SOUNDS.items()]
    samples += [chat((f"Write {n} as a word.", f"{NUMBER_WORDS[n].capitalize()}.")) for n in range(11)]
    samples += [chat((f"How many legs does {a} have?", f"{n}.")) for a, n in LEGS.items()]
    samples += [chat((f"What is the first letter of {w}?", f"{w[0].upper()}.")) for w in WORDS]
    samples += [chat((f"What comes after {n}?", f"{n + 1}.")) for n in range(20)]
    pairs = sorted({(a, b) for a in range(10) for b in range(10)})
    for a, b in rng.sample(pairs, 80):
        samples.append(chat((f"What is {a} plus {b}?", f"{a + b}.")))
    for a, b in rng.sample([(a, b) for a, b in pairs if a >= b], 40):
        samples.append(chat((f"What is {a} minus {b}?", f"{a - b}.")))
    samples += [chat((user, answer), system=system) for system, user, answer in SYSTEM_PROMPTS]
    countries = list(CAPITALS)
    for _ in range(15):
        c1, c2 = rng.sample(countries, 2)
        samples.append(chat((f"What is the capital of {c1}?", f"{CAPITALS[c1]}."),
                            (f"And of {c2}?", f"{CAPITALS[c2]}.")))
    for _ in range(10):
        a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
        samples.append(chat((f"What is {a} plus {b}?", f"{a + b}."),
                            (f"Add {c} to that.", f"{a + b + c}.")))
    rng.shuffle(samples)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    samples = make_samples(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=True) + "\n")
    print(f"wrote {len(samples)} samples to {args.out}")


if __name__ == "__main__":
    main()
