#!/usr/bin/env python3
"""Generate the third demo task for `pipeline`: support-ticket routing, a classification task.

Each example is a short customer message to an online shop (an email or a chat line, 8-60 words, 24 on average)
and the answer is the one department that should handle it, one of eight labels:

    "Please add our VAT number DE837895083 to last month's invoice. (My earlier ticket, 'I received a text with a
     login code that I didn't request.', is solved, thanks.)"  ->  billing

billing   money already charged or invoiced: a double charge, an invoice copy, the card on file, tax, a price rise
shipping  getting an order to the customer: late, lost, stuck at customs, address change, courier, tracking
returns   sending an item back: return labels, exchanges, the refund of a returned item, return postage
technical something in the site or app that is broken: crashes, error codes, blank pages, sync, pairing
account   the customer's own login and profile: passwords, two-factor, email change, locked, delete, merge
security  anything the customer says they did not do: unknown charges, logins, orders, address changes, phishing
sales     buying something new or more: quotes, seats, upgrades, bulk prices, demos, stock
feedback  an opinion with nothing to act on: praise, complaints about staff, suggestions, feature wishes

Two rules, stated in the instruction, settle the messages that touch two departments:

* route by what the customer asks for now, not by what they mention in passing: about 3 in 10 messages carry a
  resolved or past remark about another department's topic ("I already reset my password and can log in fine."),
  1 in 4 quotes another department's request as an earlier ticket that is solved ("Earlier ticket, already
  solved: <a shipping request> New question: <a billing request>"), and 1 in 7 opens with a misleading pointer
  ("The chat bot sent me to billing, but I don't think that's right.", "Subject: my login.");
* a charge, login or change the customer did not make is security (an unknown charge is not billing; a password
  change they did not make is not account), while the same change made by the customer stays with its
  department ("I updated my email yesterday and now I can't log in" is account).

The rest (a refund of a returned item is returns, a refund of a double charge is billing; buying more seats is
sales, a price rise on the current plan is billing; a blank page after "Pay now" is technical; an opinion about
the new layout is feedback) the adapter learns from the examples. Unlike the medication task (extraction into
JSON) and the date task (a rewrite), the answer is one of eight fixed words, scored by exact match. Labels are
balanced: 150 rows of each in train, 30 in eval, each label once in every 8 rows. Standard library only; seeded,
so two runs with the same seed give byte-identical files.

    python data/make_tickets.py [--seed 0] [--out-dir data/tickets]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re

N_TRAIN = 1200
N_EVAL = 240
MIN_WORDS = 8
MAX_WORDS = 60

LABELS = ["billing", "shipping", "returns", "technical", "account", "security", "sales", "feedback"]

# Names every label, so that an untrained model can at least answer with one word from the list; the two rules
# are the ones no amount of keyword matching resolves.
INSTRUCTION = (
    "Route this customer message to one department: billing, shipping, returns, technical, account, security, "
    "sales or feedback. Go by what the customer asks for now, not what they mention in passing. A charge, login "
    "or change the customer did not make themselves goes to security. Answer with the department name only."
)

# --------------------------------------------------------------------------------------------
# Requests: what the customer asks for, per department. "[a|b|c]" is a paraphrase picked at random,
# "{slot}" a value drawn for each message (see `draw_slots`).
# --------------------------------------------------------------------------------------------
REQUESTS: dict[str, list[str]] = {
    "billing": [
        "I was [charged|billed] twice for order {order}[; please refund the extra {amount}.|. Can you reverse one of "
        "the payments?| and want one of the {amount} payments back.]",
        "[Could you|Can you|Please] send me a copy of invoice {invoice}[? I need it for my expense report.|, I can't "
        "find it in my emails.|.]",
        "My card ending in {card} [has expired|was replaced by my bank]. How do I update the payment method [on "
        "file|for my subscription]?",
        "The invoice for order {order} says {amount}, but the price at checkout was {amount2}. [Which one is "
        "right?|Please correct it.]",
        "Please add our VAT number {vat} to [last month's|the {month}] invoice.",
        "Why did my [monthly|yearly] [subscription|plan] [go up|increase] from {amount2} to {amount}[ without "
        "notice|]?",
        "I cancelled my subscription on {date} but [was still billed|still got charged] {amount} [this month|on the "
        "next cycle].",
        "The discount code {code} [was not applied|didn't come off the total] and I paid the full {amount}. Can you "
        "credit the difference?",
        "Can I [switch|move] from monthly to annual billing [on my current plan|for the same plan]?",
        "I need a receipt [with|showing] my company name for order {order}.",
        "My payment of {amount} [keeps being declined|was declined twice] even though the card works [everywhere "
        "else|in other shops].",
        "You charged me {amount} [in sales tax|for tax] but we are [tax-exempt|a registered charity] and sent the "
        "certificate.",
        "There is a charge of {amount} on {date} that I made, but [in the wrong currency|for the wrong amount]. "
        "[Please fix it.|Can you correct it?]",
    ],
    "shipping": [
        "Order {order} was [supposed|due] to arrive [on {date}|by {date}] and [still hasn't|it still hasn't shown "
        "up|is nowhere to be seen].",
        "The tracking for order {order} has said \"in transit\" for {n} days. [Is it lost?|What is going on?|Can you "
        "check with the courier?]",
        "Can you change the delivery address for order {order} to {street}? It [hasn't shipped yet|still shows as "
        "processing].",
        "The courier [left|delivered] my {parcel} [at the wrong house|to a neighbour I don't know|at the wrong "
        "address]. [Can you find out where it is?|Please help me get it.]",
        "Do you [deliver|ship] to {country}, and how long does it [usually |]take?",
        "Only {k} of the {n} boxes in order {order} [arrived|were delivered]; where are the others?",
        "The tracking number you [emailed|sent] me [doesn't work|shows nothing] on the courier's [site|website].",
        "[Is express delivery available|Can I get express delivery] for order {order}? I need it before {date}.",
        "Can I [collect|pick up] my {parcel} [from a pickup point|at the depot] instead of waiting at home?",
        "The {parcel} was marked as [delivered|handed over] [on {date}|yesterday], but nothing [is at|came to] my "
        "door.",
        "[My|The] {parcel} [has been stuck|is stuck] at customs in {country} for {n} days.",
    ],
    "returns": [
        "I'd like to return the {product} from order {order}[; it doesn't fit.|, it's the wrong colour.| because I "
        "changed my mind.]",
        "I [sent|posted|mailed] the {product} back on {date}; when will I get my refund?",
        "Can I exchange the {product} for a [different|bigger|smaller] size?",
        "How do I [print|get] a return label for order {order}?",
        "I bought the {product} {n} days ago. Is it still [inside the return window|possible to send it back]?",
        "The {product} [stopped working|broke] after a week and I want to send it back for a replacement.",
        "Where can I drop off a return in {city}?",
        "You [received|got] my returned {product} {n} days ago but the refund [hasn't shown up|is still missing].",
        "The {product} I received is [not what I ordered|the wrong model]; I want to send it back.",
        "Do I have to pay for [return postage|the postage] if I send the {product} back?",
        "Can I return [just one item|part] of order {order} and keep the rest?",
    ],
    "technical": [
        "The {app} crashes every time I open the {screen} [screen|page] on my {device}.",
        "I get [error|error code] {error} when I try to upload a [file|photo].",
        "The [website|site] won't load the {screen} page in {browser}[; it just spins.|, it stays blank.|.]",
        "[Sync|Syncing] between my {device} and my {device2} stopped working after the update to version {version}.",
        "Notifications [stopped arriving|no longer show up] on my {device}[ since {date}|].",
        "The [export|download] to CSV button does nothing [when I click it|in {browser}].",
        "After I click '[Pay now|Place order]' the page goes blank[ and nothing happens|].",
        "My {gadget} won't [pair|connect] with my {device} over Bluetooth.",
        "Search shows no results no matter what I type[, even for items I know you sell|].",
        "The {app} [logs me out|freezes] every few minutes on my {device}.",
        "Videos in the {app} [won't play|stop after a few seconds] on my {device}.",
    ],
    "account": [
        "I forgot my password and the reset email [never arrives|doesn't come].",
        "How do I change the email address on my account[ to {email}|]?",
        "Please [delete|close] my account[ and all my data| for good|].",
        "I [got a new phone|changed my phone number] and can't get the two-factor code anymore.",
        "Can you merge my two accounts, {email} and {email2}?",
        "I [changed|updated] my email [yesterday|on {date}] and now I can't log in.",
        "My account is locked after too many [login attempts|wrong passwords]; [please unlock it.|how long do I "
        "wait?]",
        "I want to change the name on my profile to {fullname}.",
        "How do I turn on two-factor [login|authentication] for my account?",
        "I have two accounts by mistake; [can you close|please remove] the one under {email}.",
        "Where do I change my [username|display name|phone number] in the account settings?",
        "I changed my password [yesterday|this morning] and now the site says it is wrong.",
    ],
    "security": [
        "There is a [charge|payment] of {amount} on {date} that I [did not make|don't recognise|never authorised].",
        "I got an email saying my password was changed, but I [didn't change it|never did that].",
        "Someone [logged|signed] into my account from {city}[; it wasn't me.|, and I have never been there.]",
        "My delivery address was changed to [one I don't know|{street}, which isn't mine].",
        "An order I never placed ({order}) is [on its way|being shipped] to an address I don't know.",
        "I received a text with a login code that I [didn't request|never asked for].",
        "[I think|It looks like] my account was hacked: my saved card was used for {n} orders I didn't place.",
        "A device called '{device}' [appeared|is listed] in my account, and it isn't mine.",
        "Someone phoned me [claiming to be|saying they were] from your company and asked for my card number.",
        "My email and phone number on the account were changed, and I didn't do it.",
        "My password was changed [yesterday|this morning] and it wasn't me.",
        "I got an email that looks like yours asking me to confirm my card details[; is it real?| through a "
        "strange link.]",
    ],
    "sales": [
        "We'd like a quote for {n} [licences|licenses|seats] for our team.",
        "Do you offer [discounts|a better price] for bulk orders of {n0} units of the {product}?",
        "I want to upgrade from the {plan} plan to the {plan2} plan[; what does it include?|. How do I buy it?]",
        "Could someone give us a demo of the {plan2} version before we [buy|sign]?",
        "[When will|Will] the {product} be back in stock? I want to [buy|order] {n}.",
        "Do you have [an education|a non-profit|a student] price for the {plan2} plan?",
        "We are opening {n} new offices and want to add them to our contract.",
        "What is the [difference|price difference] between the {plan} and {plan2} plans? We're [thinking of "
        "buying|about to buy] one.",
        "Can we [buy|order] gift cards worth {amount} for our staff?",
        "I'm interested in [reselling|stocking] your products in my shop in {city}.",
        "Can I add {n} more seats to our {plan} plan?",
    ],
    "feedback": [
        "Just wanted to say that {agent} on [chat|the phone] was incredibly helpful[ yesterday|].",
        "I [liked|preferred] the old {screen} [page|layout] better; the new one is hard to read.",
        "Suggestion: let customers pay with {paymethod}.",
        "Your delivery driver was [rude|very rude] to my [mother|neighbour]. I want to pass that on.",
        "Great [product|shop], I've recommended you to {n} friends.",
        "It would be nice if the {app} had a dark mode.",
        "I waited {n0} minutes on hold [yesterday|on {date}]; that is too long.",
        "[Five stars|Big thanks] for the packaging: no plastic at all.",
        "The {product} is the best I've owned[, thank you.|. Keep it up.]",
        "[Please pass on|I want to share] a complaint: your [emails|newsletters] come far too often.",
        "Your new return policy is [much fairer|a step backwards], [just so you know|in my opinion].",
    ],
}

# Remarks in passing about another department's topic: resolved, past or not asked for. A message of department X
# only ever gets a remark of another department Y != X, so the remark is always the distractor.
MENTIONS: dict[str, list[str]] = {
    "billing": ["My last invoice was correct, by the way.", "The payment itself went through fine.",
                "I already paid the invoice for {month}.", "No problem with the charge itself."],
    "shipping": ["The parcel arrived on time, thanks.", "Delivery was quick as always.",
                 "My last order arrived fine.", "The courier was on time."],
    "returns": ["The refund for my last return came through, thanks.",
                "I returned a {product} last year and that went smoothly."],
    "technical": ["The app crashed earlier but a restart fixed it.", "The update installed fine.",
                  "The website works fine now."],
    "account": ["I already reset my password and can log in fine.", "I'm logged in without problems.",
                "I changed my email last month and that worked."],
    "security": ["I checked my login history and everything looks normal.",
                 "I know about the phishing warning you sent."],
    "sales": ["We're happy with our current plan.", "We might upgrade later, but not now."],
    "feedback": ["Love the product, by the way.", "Your team was great last time.",
                 "Your support has always been good to me."],
}

# Another department's request, quoted as an earlier ticket that is already solved: the hardest remark in passing,
# since its words are exactly those of a message to that department.
HISTORY = [
    "Last time I wrote '{earlier}' and you sorted it quickly. {request}",
    "{request} (My earlier ticket, '{earlier}', is solved, thanks.)",
    "Earlier ticket, already solved: {earlier} New question: {request}",
    "You already fixed my last problem ('{earlier}'). {request}",
]

# Openers that point at the wrong department, by name or by topic.
TRAPS = [
    "The chat bot sent me to {wrong}, but I don't think that's right.",
    "[Not sure|No idea] if this is for {wrong} or someone else.",
    "This is not about {topic}.",
    "I was transferred to {wrong} twice already.",
    "[Subject|Re]: {topic}.",
]
TOPICS = {
    "billing": "my bill", "shipping": "a delivery", "returns": "a return", "technical": "a bug",
    "account": "my login", "security": "fraud", "sales": "a purchase", "feedback": "a complaint",
}

GREETINGS = ["", "", "", "", "Hi,", "Hello,", "Hi team,", "Dear support,", "Hey there,", "Good morning,",
             "Re: order {order}.", "Subject: [Help please|Question|Urgent|My account|Invoice|Order {order}]."]
SIGN_OFFS = ["", "", "", "", "Thanks.", "Thanks in advance!", "Regards, {name}", "Cheers, {name}",
             "Thank you, {fullname}", "Sent from my phone", "Kind regards."]

# --------------------------------------------------------------------------------------------
# Slot values.
# --------------------------------------------------------------------------------------------
FIRST_NAMES = ["Priya", "Tom", "Ana", "Kenji", "Fatima", "Lars", "Chloé", "Mateo", "Grace", "Omar", "Julia", "Wei"]
LAST_NAMES = ["Shah", "Baker", "Silva", "Tanaka", "Haddad", "Berg", "Martin", "Rossi", "Okafor", "Novak"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
# Singular nouns only: templates say "the {product} is".
PRODUCTS = ["jacket", "blender", "desk lamp", "toaster", "rain coat", "coffee grinder", "backpack", "phone case",
            "wool sweater", "smart watch", "kettle", "office chair", "yoga mat", "speaker"]
GADGETS = ["headphones", "smart watch", "speaker", "fitness tracker", "earbuds"]
DEVICES = ["iPhone", "Android phone", "iPad", "Windows laptop", "MacBook", "Chromebook", "Galaxy tablet"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge"]
APPS = ["app", "mobile app", "desktop app"]
SCREENS = ["settings", "checkout", "order history", "profile", "search", "cart", "wishlist"]
PARCELS = ["parcel", "package", "delivery", "order"]
CITIES = ["Lyon", "Denver", "Osaka", "Leeds", "Porto", "Toronto", "Melbourne", "Nairobi", "Kraków", "Austin"]
COUNTRIES = ["Norway", "Canada", "Japan", "Brazil", "Switzerland", "Australia", "Mexico", "Iceland"]
STREETS = ["Elm Street", "Station Road", "Rue Victor Hugo", "Maple Avenue", "High Street", "Kings Road"]
PLANS = ["Basic", "Plus", "Pro", "Team", "Enterprise"]
CODES = ["SPRING10", "WELCOME15", "SAVE20", "FREESHIP", "VIP25"]
PAYMETHODS = ["PayPal", "Apple Pay", "bank transfer", "Klarna", "cash on delivery"]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "proton.me", "example.org"]

ALTERNATIVE = re.compile(r"\[([^\[\]]*)\]")


def pick_alternatives(r: random.Random, text: str) -> str:
    """Replace every "[a|b|c]" with one of its alternatives (an empty one drops the phrase)."""
    return ALTERNATIVE.sub(lambda m: r.choice(m.group(1).split("|")), text)


def decap(text: str) -> str:
    """Lower-case the first letter so that a sentence can follow "But", unless it is "I" or a name."""
    first = text.split(" ", 1)[0]
    if first in ("I", "I'd", "I'm") or first.rstrip(",.:") in CITIES + FIRST_NAMES + PLANS:
        return text
    return text[0].lower() + text[1:]


def draw_slots(r: random.Random) -> dict[str, str]:
    """One value for every slot a template may use (unused ones cost nothing but random draws)."""
    cur = r.choice(["$", "€", "£"])
    device, device2 = r.sample(DEVICES, 2)
    plan, plan2 = sorted(r.sample(range(len(PLANS)), 2))
    first, last = r.choice(FIRST_NAMES), r.choice(LAST_NAMES)
    n = r.randrange(2, 13)
    day, month = r.randrange(1, 29), r.randrange(12)
    return {
        "order": r.choice(["#", "", "A-"]) + str(r.randrange(100000, 999999)),
        "amount": f"{cur}{r.randrange(5, 480)}.{r.randrange(100):02d}",
        "amount2": f"{cur}{r.randrange(5, 480)}.{r.randrange(100):02d}",
        "invoice": f"INV-{r.randrange(10000, 99999)}",
        "card": f"{r.randrange(10000):04d}",
        "vat": f"{r.choice(['GB', 'DE', 'FR', 'IE', 'NL'])}{r.randrange(10**8, 10**9)}",
        "month": MONTHS[month],
        "date": r.choice([f"{MONTHS[month]} {day}", f"{day} {MONTHS[month][:3]}", f"{month + 1}/{day}"]),
        "code": r.choice(CODES),
        "n": str(n),
        "n0": str(r.choice([10, 20, 30, 40, 50, 100, 200])),
        "k": str(r.randrange(1, n)),
        "street": f"{r.randrange(1, 240)} {r.choice(STREETS)}",
        "country": r.choice(COUNTRIES),
        "city": r.choice(CITIES),
        "product": r.choice(PRODUCTS),
        "gadget": r.choice(GADGETS),
        "parcel": r.choice(PARCELS),
        "app": r.choice(APPS),
        "screen": r.choice(SCREENS),
        "device": device,
        "device2": device2,
        "browser": r.choice(BROWSERS),
        "version": f"{r.randrange(2, 9)}.{r.randrange(20)}.{r.randrange(10)}",
        "error": r.choice([f"E{r.randrange(100, 999)}", str(r.choice([400, 403, 500, 502, 503])),
                           f"0x80{r.randrange(4096):03X}"]),
        "email": f"{first.lower()}{r.randrange(1, 99)}@{r.choice(DOMAINS)}",
        "email2": f"{first.lower()}.{last.lower()}@{r.choice(DOMAINS)}",
        "name": first,
        "fullname": f"{first} {last}",
        "agent": r.choice(FIRST_NAMES),
        "plan": PLANS[plan],
        "plan2": PLANS[plan2],
        "paymethod": r.choice(PAYMETHODS),
    }


def fill(r: random.Random, template: str, slots: dict[str, str]) -> str:
    return pick_alternatives(r, template).format(**slots)


def make_example(r: random.Random, label: str) -> tuple[str, str]:
    """(message, kind) for one message to `label`; kind is "plain", "mention" (a remark in passing about another
    department), "history" (another department's request quoted as an earlier, solved ticket) or "trap" (an opener
    naming the wrong department or topic)."""
    slots = draw_slots(r)
    request = fill(r, r.choice(REQUESTS[label]), slots)
    other = r.choice([x for x in LABELS if x != label])
    kind = r.choices(["plain", "mention", "history", "trap"], weights=[30, 30, 25, 15])[0]
    if kind == "mention":
        remark = fill(r, r.choice(MENTIONS[other]), slots)
        joined = [f"{remark} {request}", f"{remark} But {decap(request)}", f"{request} {remark}",
                  f"{request} Also, {decap(remark)}"]
        if label != "feedback":  # feedback asks for nothing
            joined.append(f"{remark} What I need now: {decap(request)}")
        body = r.choice(joined)
    elif kind == "history":
        earlier = fill(r, r.choice(REQUESTS[other]), slots)
        body = r.choice(HISTORY).format(earlier=earlier, request=request)
    elif kind == "trap":
        body = fill(r, r.choice(TRAPS), {"wrong": other, "topic": TOPICS[other]}) + " " + request
    else:
        body = request
    parts = [fill(r, r.choice(GREETINGS), slots), body, fill(r, r.choice(SIGN_OFFS), slots)]
    text = " ".join(p for p in parts if p)
    if r.random() < 0.15:  # chat style: all lower case, no final full stop
        text = text.lower().rstrip(".")
    return text, kind


def generate(seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows; every 8 rows of a part hold each label once, in shuffled order, so that any head of a
    file (a smoke run's slice, the first 480 rows) is balanced too. No text is in both parts."""
    r = random.Random(seed)
    seen: set[str] = set()
    parts: dict[str, list[dict]] = {}
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        labels = []
        for _ in range(n // len(LABELS)):
            labels += r.sample(LABELS, len(LABELS))
        rows = []
        for label in labels:
            while True:
                text, kind = make_example(r, label)
                if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen:
                    break
            seen.add(text)
            rows.append({"id": f"ticket-{split}-{len(rows):05d}", "instruction": INSTRUCTION, "input": text,
                         "output": label, "_kind": kind})
        parts[split] = rows
    train, evals = parts["train"], parts["eval"]
    assert not {x["input"] for x in train} & {x["input"] for x in evals}, "a held-out text is also in train"
    return train, evals


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            clean = {k: v for k, v in row.items() if not k.startswith("_")}  # private bookkeeping
            f.write(json.dumps(clean, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tickets"))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    train, evals = generate(args.seed)
    write_jsonl(os.path.join(args.out_dir, "task_train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "task_eval.jsonl"), evals)
    kinds = collections.Counter(x["_kind"] for x in train + evals)
    print(f"wrote {len(train)} train and {len(evals)} eval examples to {args.out_dir} (seed {args.seed}; "
          f"{len(train) // len(LABELS)} and {len(evals) // len(LABELS)} per label; "
          f"{kinds['mention']} with a remark in passing, {kinds['history']} quoting an earlier solved ticket, "
          f"{kinds['trap']} with a misleading opener)")


if __name__ == "__main__":
    main()
