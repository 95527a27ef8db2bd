#!/usr/bin/env python3
"""Generate the second demo task for `pipeline`: date normalisation, a rewriting task.

Each example is a short sentence (an appointment, a delivery, an invoice, a meeting; English or
Japanese) that contains exactly one calendar date written in one of many styles, next to distractor
numbers (times, amounts, order numbers, room numbers, durations). The answer is the date alone in
ISO 8601, `YYYY-MM-DD`:

    "Your parcel (order 48213, 3 items) will arrive on Tue, 5 Mar 2024 between 9 and 11."  ->  2024-03-05

Conventions the adapter has to learn from the examples (the instruction does not spell them out):

* slashes are month/day/year as in the US (`03/05/2024` is 5 March), unless the year comes first
  (`2024/3/5`, Japanese style, year/month/day);
* dots and dashes with the year last are day.month.year as in Europe (`05.03.2024`, `5-3-2024`);
* two-digit years are 20xx (`5 Mar '24`);
* ordinals, weekday names, month abbreviations with or without a dot, and Japanese `2024年3月5日`
  and `令和6年3月5日` (Reiwa era: year 1 = 2019) all name the same day.

Unlike the medication task (extraction into JSON), the answer here is a short rewrite with one
correct string, scored by exact match. Standard library only; seeded, so two runs with the same
seed give byte-identical files.

    python data/make_dates.py [--seed 0] [--out-dir data/dates]
"""

from __future__ import annotations

import argparse
import calendar
import datetime
import json
import os
import random

N_TRAIN = 1200
N_EVAL = 240
FIRST, LAST = datetime.date(2015, 1, 1), datetime.date(2032, 12, 31)

INSTRUCTION = "Give the date mentioned in the text as YYYY-MM-DD."

MONTHS = list(calendar.month_name)[1:]
MONTHS_SHORT = [m[:3] for m in MONTHS]
WEEKDAYS = list(calendar.day_name)
WEEKDAYS_SHORT = [d[:3] for d in WEEKDAYS]
JA_WEEKDAYS = ["月", "火", "水", "木", "金", "土", "日"]
REIWA_START = 2019


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each style renders a date; the English ones and the Japanese ones go into sentences of their language.
def _month(r: random.Random, d: datetime.date) -> str:
    return r.choice([MONTHS[d.month - 1], MONTHS_SHORT[d.month - 1], MONTHS_SHORT[d.month - 1] + "."])


def _weekday(r: random.Random, d: datetime.date) -> str:
    return r.choice([WEEKDAYS[d.weekday()], WEEKDAYS_SHORT[d.weekday()]]) + ", "


def _year(r: random.Random, d: datetime.date) -> str:
    return r.choice([str(d.year)] * 3 + [f"'{d.year % 100:02d}"])


EN_STYLES = {
    "day month year": lambda r, d: f"{r.choice([str(d.day), ordinal(d.day)])} {_month(r, d)} {_year(r, d)}",
    "month day, year": lambda r, d: f"{_month(r, d)} {r.choice([str(d.day), ordinal(d.day)])}, {_year(r, d)}",
    "weekday day month year": lambda r, d: f"{_weekday(r, d)}{d.day} {_month(r, d)} {d.year}",
    "weekday month day year": lambda r, d: f"{_weekday(r, d)}{_month(r, d)} {d.day}, {d.year}",
    "the nth of month": lambda r, d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    "US slashes": lambda r, d: r.choice([f"{d.month:02d}/{d.day:02d}/{d.year}", f"{d.month}/{d.day}/{d.year}"]),
    "European dots": lambda r, d: r.choice([f"{d.day:02d}.{d.month:02d}.{d.year}", f"{d.day}.{d.month}.{d.year}"]),
    "European dashes": lambda r, d: f"{d.day}-{d.month}-{d.year}",
    "ISO already": lambda r, d: d.isoformat(),
    "year first slashes": lambda r, d: r.choice([f"{d.year}/{d.month}/{d.day}", f"{d.year}/{d.month:02d}/{d.day:02d}"]),
}

JA_STYLES = {
    "年月日": lambda r, d: f"{d.year}年{d.month}月{d.day}日" + r.choice(["", f"（{JA_WEEKDAYS[d.weekday()]}）"]),
    "令和": lambda r, d: f"令和{d.year - REIWA_START + 1}年{d.month}月{d.day}日",
    "year first slashes": lambda r, d: f"{d.year}/{d.month}/{d.day}",
}

EN_TEMPLATES = [
    "Your parcel (order {order}, {items} items) will arrive on {date} between {hour} and {hour2}.",
    "Reminder: dental check-up on {date} at {hour}:{minute:02d}, room {room}. Please arrive 10 minutes early.",
    "Invoice {order} for ${amount}.{cents:02d} is due {date}; late fees apply after {days} days.",
    "The team offsite moves to {date}; we booked {items} rooms for {hour} people.",
    "Flight BA{room} departs {date} at {hour}:{minute:02d} from gate {items}.",
    "We received your payment of ${amount} on {date}. Reference: {order}.",
    "Library notice: the {items} books you borrowed are due back by {date}.",
    "Hi all, the quarterly review ({days} slides) is scheduled for {date}, {hour} pm.",
    "Lease signed on {date} for unit {room}, monthly rent ${amount}.",
    "Patient seen {date}; follow-up in {days} days, weight {weight} lb.",
    "Note: the warranty for serial {order} started on {date} and lasts {items} years.",
    "Concert tickets x{items}, row {room}, for {date}; doors open at {hour}:{minute:02d}.",
]

JA_TEMPLATES = [
    "ご注文（注文番号 {order}）の商品は{date}に{hour}時ごろお届けします。",
    "次回の打ち合わせは{date}の{hour}時{minute}分から、{room}号室で行います。",
    "請求書 {order}（{amount}円）のお支払い期限は{date}です。",
    "{date}に{items}名で予約しました。",
    "図書館からのお知らせ：{items}冊の返却期限は{date}です。",
]


def make_example(r: random.Random) -> tuple[str, str, str]:
    """(text, answer, style) for one random date and sentence."""
    d = FIRST + datetime.timedelta(days=r.randrange((LAST - FIRST).days + 1))
    if d.year < REIWA_START + 1:
        japanese = r.random() < 0.12
        styles = {k: v for k, v in JA_STYLES.items() if k != "令和"} if japanese else EN_STYLES
    else:
        japanese = r.random() < 0.2
        styles = JA_STYLES if japanese else EN_STYLES
    style = r.choice(sorted(styles))
    date = styles[style](r, d)
    template = r.choice(JA_TEMPLATES if japanese else EN_TEMPLATES)
    text = template.format(date=date, order=r.randrange(10000, 99999), items=r.randrange(2, 9),
                           hour=r.randrange(1, 12), hour2=r.randrange(1, 12), minute=r.choice([0, 15, 30, 45]),
                           room=r.randrange(100, 999), amount=r.randrange(20, 2500), cents=r.randrange(100),
                           days=r.choice([7, 14, 30, 60, 90]), weight=r.randrange(90, 260))
    return text, d.isoformat(), style


def generate(seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows; no text appears in both parts."""
    r = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < N_TRAIN + N_EVAL:
        text, answer, _ = make_example(r)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"instruction": INSTRUCTION, "input": text, "output": answer})
    train, evals = rows[:N_TRAIN], rows[N_TRAIN:]
    return ([{"id": f"date-train-{i:05d}", **x} for i, x in enumerate(train)],
            [{"id": f"date-eval-{i:05d}", **x} for i, x in enumerate(evals)])


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dates"))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    train, evals = generate(args.seed)
    write_jsonl(os.path.join(args.out_dir, "task_train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "task_eval.jsonl"), evals)
    print(f"wrote {len(train)} train and {len(evals)} eval examples to {args.out_dir}")


if __name__ == "__main__":
    main()
