"""Write the review-opener prompts: a training split (DPO pairs, distillation data) and an
evaluation split (the benchmark), disjoint by *subject* so no evaluation subject is ever
seen in training.

Every prompt is the neutral opening words of a review (domain x subject x opener); the
sentiment is left to the continuation. Written by hand for this project (no external text).
Seeded and deterministic:  python scripts/make_prompts.py  (< 1 s).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

DOMAINS = {
    "movie": {
        "subjects": [
            "the new space western", "the courtroom drama", "the animated film about a lost fox",
            "the horror remake", "the documentary about bees", "the heist thriller",
            "the musical biopic", "the war epic", "the romantic comedy set in Lisbon",
            "the superhero sequel", "the silent film restoration", "the coming-of-age indie film",
            "the disaster movie", "the spy thriller", "the fantasy adventure",
            "the detective noir", "the sports drama", "the time-travel comedy",
            "the survival film set in Alaska", "the period drama", "the robot movie",
            "the mountaineering documentary", "the family road-trip movie", "the monster film",
        ],
        "openers": [
            "I watched {s} last night and", "Going into {s}, I expected", "My review of {s}:",
            "After seeing {s} in the cinema, I", "The first thing to say about {s} is that",
            "I finally got around to {s}, and", "We rented {s} on Friday.", "So, {s}.",
            "Having read the book, I went to see {s} and", "Two hours of {s}, and",
        ],
    },
    "restaurant": {
        "subjects": [
            "the ramen place on Fifth Street", "the new taqueria downtown", "the hotel brunch buffet",
            "the family-run Italian bistro", "the vegan cafe near campus", "the steakhouse by the river",
            "the dim sum restaurant", "the food truck at the market", "the seafood shack on the pier",
            "the rooftop bar", "the bakery on the corner", "the Ethiopian restaurant",
            "the sushi counter", "the pizza place near the station", "the diner on Route 9",
            "the Thai noodle house", "the tapas bar", "the burger joint by the stadium",
            "the tea room in the old town", "the Korean barbecue spot", "the French brasserie",
            "the airport food court", "the curry house", "the breakfast cafe",
        ],
        "openers": [
            "We had dinner at {s} and", "My review of {s}:", "I went to {s} for lunch today.",
            "Last weekend we tried {s}, and", "A friend recommended {s}, so", "About {s}:",
            "We booked a table at {s} for my birthday and", "I have eaten at {s} twice now, and",
            "Stopped by {s} after work.", "The menu at {s}",
        ],
    },
    "product": {
        "subjects": [
            "this blender", "these wireless earbuds", "this office chair", "this electric kettle",
            "this backpack", "this robot vacuum", "this phone case", "this air fryer",
            "this desk lamp", "these running shoes", "this mechanical keyboard", "this coffee grinder",
            "this tent", "this smart watch", "this cast-iron pan", "this electric toothbrush",
            "this bike helmet", "this portable speaker", "this mattress", "this winter jacket",
            "this webcam", "this kitchen scale", "this hair dryer", "this baby monitor",
        ],
        "openers": [
            "I bought {s} a month ago and", "My review of {s}:", "I have been using {s} for a week.",
            "After two months with {s}, I", "I ordered {s} online and", "So I finally tried {s}, and",
            "We got {s} as a gift and", "Here is what I think of {s}:", "Out of the box, {s}",
            "I replaced my old one with {s}, and",
        ],
    },
    "book": {
        "subjects": [
            "this mystery novel", "the new fantasy trilogy", "this cookbook", "the memoir by the retired pilot",
            "this history of the Silk Road", "the poetry collection", "this science fiction novel",
            "the self-help book everyone talks about", "this graphic novel", "the biography of the composer",
            "this children's picture book", "the thriller set in Oslo", "this travel guide",
            "the essay collection", "this book on gardening", "the historical romance",
            "this popular physics book", "the short story collection", "this young adult novel",
            "the novel about a lighthouse keeper", "this programming textbook", "the crime novel",
            "this book about chess", "the debut novel from the journalist",
        ],
        "openers": [
            "I just finished {s} and", "My review of {s}:", "I picked up {s} at the library and",
            "Halfway through {s}, I", "Our book club read {s}, and", "About {s}:",
            "I read {s} on holiday.", "A colleague lent me {s}, and", "I had heard a lot about {s}, so",
            "The first chapter of {s}",
        ],
    },
    "hotel": {
        "subjects": [
            "the beach resort", "the budget hotel near the airport", "the mountain lodge",
            "the boutique hotel in the old quarter", "the hostel by the station", "the lakeside cabin",
            "the conference hotel", "the bed and breakfast", "the ski chalet", "the city-centre apartment",
            "the motel off the highway", "the eco-lodge", "the castle hotel", "the campsite by the river",
            "the spa hotel", "the guesthouse in the village", "the cruise ship cabin",
            "the farm stay", "the harbour inn", "the desert camp", "the capsule hotel",
            "the country house hotel", "the family resort", "the houseboat",
        ],
        "openers": [
            "We stayed three nights at {s} and", "My review of {s}:", "I booked {s} for a work trip.",
            "We spent our honeymoon at {s}, and", "Checking in at {s},", "About {s}:",
            "Our family stayed at {s} last summer and", "I chose {s} because of the photos, and",
            "One night at {s}.", "The room at {s}",
        ],
    },
    "game": {
        "subjects": [
            "the new open-world game", "this board game", "the puzzle game", "this card game",
            "the racing game", "the farming simulator", "the strategy game", "this party game",
            "the platformer", "the detective adventure game", "the city-building game",
            "this cooperative board game", "the rhythm game", "the space trading game",
            "the survival crafting game", "the football game", "this word game", "the roguelike",
            "the fighting game", "this escape-room kit", "the tower-defence game", "the flight simulator",
            "this trivia game", "the pixel-art adventure",
        ],
        "openers": [
            "I played {s} all weekend and", "My review of {s}:", "We tried {s} at game night.",
            "Ten hours into {s}, I", "I bought {s} on sale and", "About {s}:",
            "My kids asked for {s}, so", "I had been waiting for {s}, and", "So, {s}.",
            "The tutorial of {s}",
        ],
    },
}


def build(seed: int, eval_per_domain: int, train_per_domain: int, eval_subject_frac: float):
    rng = random.Random(seed)
    train, evaluation = [], []
    for domain, spec in DOMAINS.items():
        subjects = list(spec["subjects"])
        rng.shuffle(subjects)
        n_eval = max(1, round(len(subjects) * eval_subject_frac))
        splits = {"eval": subjects[:n_eval], "train": subjects[n_eval:]}
        for split, subs in splits.items():
            combos = [(s, o) for s in subs for o in spec["openers"]]
            rng.shuffle(combos)
            want = eval_per_domain if split == "eval" else train_per_domain
            if want > len(combos):
                raise ValueError(f"{domain}/{split}: want {want} prompts, only {len(combos)} combinations")
            for s, o in combos[:want]:
                text = o.format(s=s)
                text = text[0].upper() + text[1:]
                row = {"domain": domain, "subject": s, "prompt": text}
                (evaluation if split == "eval" else train).append(row)
    rng.shuffle(train)
    rng.shuffle(evaluation)
    for i, row in enumerate(train):
        row["id"] = f"train-{i:04d}"
    for i, row in enumerate(evaluation):
        row["id"] = f"eval-{i:04d}"
    return train, evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-per-domain", type=int, default=40)
    ap.add_argument("--train-per-domain", type=int, default=150)
    ap.add_argument("--eval-subject-frac", type=float, default=0.34)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sss_ext" / "models" / "prompts")
    args = ap.parse_args()
    t0 = time.process_time()
    train, evaluation = build(args.seed, args.eval_per_domain, args.train_per_domain, args.eval_subject_frac)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert not {(r["domain"], r["subject"]) for r in train} & {(r["domain"], r["subject"]) for r in evaluation}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evaluation)):
        with open(args.out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"train={len(train)} eval={len(evaluation)} -> {args.out}  cpu={time.process_time() - t0:.2f}s")


if __name__ == "__main__":
    main()
