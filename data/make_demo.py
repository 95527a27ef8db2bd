#!/usr/bin/env python3
"""Generate the demo "new task" for `pipeline`: medication extraction from short clinical notes.

Each example is a synthetic clinical note (1-3 sentences, about 25-60 words) with exactly one
active prescription and some distractors (age, vitals, lab values, dates, a stopped drug, an
allergy, a duration or a previous dose). The answer is ONE line of JSON in a canonical form:

    {"medication": "metformin", "dose": "500 mg", "frequency": "twice daily"}

* medication: lower-case generic name (even when the note writes "Metformin", "METFORMIN" or
  "Glucophage (metformin)");
* dose: "<number> <unit>", unit one of mg, mcg, g, units, mL (even when the note writes "500mg",
  "1,000 MG", "0.40 milligrams", "20 IU", "15 cc"); the number keeps its value, written without
  thousands separators, trailing zeros or a bare leading point;
* frequency: one of the fixed vocabulary in FREQUENCIES (even when the note writes "BID",
  "b.i.d.", "q12h", "qhs", "PRN", "1 tab twice a day").

Standard library only; seeded, so two runs with the same seed give byte-identical files.

    python data/make_demo.py [--seed 0] [--out-dir data/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from decimal import Decimal

N_TRAIN = 1200
N_EVAL = 240
MIN_WORDS = 25
MAX_WORDS = 60

# Kept short on purpose: every training example repeats it, and the demo runs on a 2-core CPU. The
# exact output conventions (lower-case generic name, "<number> <unit>", a fixed frequency vocabulary)
# are what the adapter has to learn from the examples.
INSTRUCTION = "Extract the active prescription as JSON with medication, dose and frequency."

# --------------------------------------------------------------------------------------------
# Frequency: canonical value -> ways a note may write it.
# --------------------------------------------------------------------------------------------
FREQUENCIES: dict[str, list[str]] = {
    "once daily": ["once daily", "daily", "once a day", "QD", "q.d.", "qDay", "every day", "1x daily", "OD"],
    "twice daily": ["twice daily", "BID", "b.i.d.", "twice a day", "two times a day", "2x/day", "bid"],
    "three times daily": ["three times daily", "TID", "t.i.d.", "three times a day", "3x daily", "tid"],
    "four times daily": ["four times daily", "QID", "q.i.d.", "four times a day", "4x daily"],
    "every 4 hours": ["every 4 hours", "q4h", "Q4H", "every four hours", "q4hr", "every 4 hrs"],
    "every 6 hours": ["every 6 hours", "q6h", "Q6H", "every six hours", "q6hr", "6-hourly"],
    "every 8 hours": ["every 8 hours", "q8h", "Q8H", "every eight hours", "q8hr", "every 8 hrs"],
    "every 12 hours": ["every 12 hours", "q12h", "Q12H", "every twelve hours", "q12hr", "12-hourly"],
    "at bedtime": ["at bedtime", "qhs", "QHS", "q.h.s.", "HS", "nightly", "before bed"],
    "every morning": ["every morning", "qAM", "q.a.m.", "each morning", "in the morning", "QAM"],
    "as needed": ["as needed", "PRN", "p.r.n.", "prn", "as required", "when needed"],
    "once weekly": ["once weekly", "once a week", "weekly", "qwk", "every week", "1x/week"],
    "every other day": ["every other day", "QOD", "q.o.d.", "on alternate days", "every 2 days"],
}

# --------------------------------------------------------------------------------------------
# Dose units: canonical unit -> ways a note may write it (after the number).
# --------------------------------------------------------------------------------------------
UNITS: dict[str, list[str]] = {
    "mg": ["mg", "mg", "mg", "MG", "milligrams", "Mg", "mgs"],
    "mcg": ["mcg", "mcg", "micrograms", "µg", "ug", "MCG"],
    "g": ["g", "g", "gm", "grams", "gram", "G"],
    "units": ["units", "units", "IU", "U", "UNITS", "international units"],
    "mL": ["mL", "mL", "ml", "cc", "milliliters", "ML"],
}

# --------------------------------------------------------------------------------------------
# Drugs: generic name, brand names, form, route words, doses (value, unit), frequencies, uses.
# form: tab (tablet/capsule, allows "1 tab ..." phrasings), liq, inj.
# --------------------------------------------------------------------------------------------
DRUGS = [
    ("metformin", ["Glucophage"], "tab", ["PO", "by mouth", "with meals"],
     [("500", "mg"), ("850", "mg"), ("1000", "mg")], ["once daily", "twice daily"],
     ["type 2 diabetes", "poorly controlled diabetes"]),
    ("lisinopril", ["Zestril"], "tab", ["PO", "by mouth"],
     [("5", "mg"), ("10", "mg"), ("20", "mg"), ("40", "mg")], ["once daily", "every morning"],
     ["hypertension", "diabetic kidney disease"]),
    ("atorvastatin", ["Lipitor"], "tab", ["PO", "by mouth"],
     [("10", "mg"), ("20", "mg"), ("40", "mg"), ("80", "mg")], ["once daily", "at bedtime"],
     ["hyperlipidemia", "coronary artery disease"]),
    ("amlodipine", ["Norvasc"], "tab", ["PO", "by mouth"],
     [("2.5", "mg"), ("5", "mg"), ("10", "mg")], ["once daily"],
     ["hypertension"]),
    ("metoprolol", ["Lopressor"], "tab", ["PO", "by mouth"],
     [("25", "mg"), ("50", "mg"), ("100", "mg")], ["twice daily", "once daily", "every 12 hours"],
     ["atrial fibrillation", "hypertension", "heart failure"]),
    ("losartan", ["Cozaar"], "tab", ["PO", "by mouth"],
     [("25", "mg"), ("50", "mg"), ("100", "mg")], ["once daily"],
     ["hypertension", "proteinuria"]),
    ("simvastatin", ["Zocor"], "tab", ["PO", "by mouth"],
     [("10", "mg"), ("20", "mg"), ("40", "mg")], ["at bedtime", "once daily"],
     ["high cholesterol"]),
    ("levothyroxine", ["Synthroid"], "tab", ["PO", "on an empty stomach"],
     [("25", "mcg"), ("50", "mcg"), ("75", "mcg"), ("88", "mcg"), ("100", "mcg"), ("125", "mcg")],
     ["once daily", "every morning"],
     ["hypothyroidism"]),
    ("omeprazole", ["Prilosec"], "tab", ["PO", "before breakfast"],
     [("20", "mg"), ("40", "mg")], ["once daily", "twice daily", "every morning"],
     ["GERD", "dyspepsia"]),
    ("pantoprazole", ["Protonix"], "tab", ["PO", "by mouth"],
     [("20", "mg"), ("40", "mg")], ["once daily", "twice daily"],
     ["reflux esophagitis", "GERD"]),
    ("sertraline", ["Zoloft"], "tab", ["PO", "by mouth"],
     [("25", "mg"), ("50", "mg"), ("100", "mg")], ["once daily", "every morning"],
     ["depression", "anxiety"]),
    ("escitalopram", ["Lexapro"], "tab", ["PO", "by mouth"],
     [("5", "mg"), ("10", "mg"), ("20", "mg")], ["once daily"],
     ["generalized anxiety disorder", "depression"]),
    ("fluoxetine", ["Prozac"], "tab", ["PO", "by mouth"],
     [("10", "mg"), ("20", "mg"), ("40", "mg")], ["once daily", "every morning"],
     ["depression"]),
    ("gabapentin", ["Neurontin"], "tab", ["PO", "by mouth"],
     [("100", "mg"), ("300", "mg"), ("600", "mg")], ["three times daily", "at bedtime"],
     ["neuropathic pain", "postherpetic neuralgia"]),
    ("amoxicillin", ["Amoxil"], "tab", ["PO", "by mouth"],
     [("250", "mg"), ("500", "mg"), ("875", "mg")],
     ["three times daily", "twice daily", "every 8 hours", "every 12 hours"],
     ["otitis media", "strep throat", "sinusitis"]),
    ("cephalexin", ["Keflex"], "tab", ["PO", "by mouth"],
     [("250", "mg"), ("500", "mg")], ["four times daily", "every 6 hours", "twice daily"],
     ["cellulitis", "skin infection"]),
    ("azithromycin", ["Zithromax"], "tab", ["PO", "by mouth"],
     [("250", "mg"), ("500", "mg")], ["once daily"],
     ["community-acquired pneumonia", "bronchitis"]),
    ("ciprofloxacin", ["Cipro"], "tab", ["PO", "by mouth"],
     [("250", "mg"), ("500", "mg"), ("750", "mg")], ["twice daily", "every 12 hours"],
     ["urinary tract infection", "pyelonephritis"]),
    ("doxycycline", ["Vibramycin"], "tab", ["PO", "with water"],
     [("100", "mg")], ["twice daily", "every 12 hours", "once daily"],
     ["Lyme disease", "acne", "cellulitis"]),
    ("nitrofurantoin", ["Macrobid"], "tab", ["PO", "with food"],
     [("50", "mg"), ("100", "mg")], ["twice daily", "four times daily"],
     ["cystitis", "urinary tract infection"]),
    ("prednisone", ["Deltasone"], "tab", ["PO", "with food"],
     [("5", "mg"), ("10", "mg"), ("20", "mg"), ("40", "mg")], ["once daily", "every morning"],
     ["COPD exacerbation", "gout flare", "asthma exacerbation"]),
    ("ibuprofen", ["Advil", "Motrin"], "tab", ["PO", "with food"],
     [("200", "mg"), ("400", "mg"), ("600", "mg"), ("800", "mg")],
     ["every 6 hours", "every 8 hours", "three times daily", "as needed"],
     ["knee osteoarthritis", "low back pain", "ankle sprain"]),
    ("acetaminophen", ["Tylenol"], "tab", ["PO", "by mouth"],
     [("325", "mg"), ("500", "mg"), ("650", "mg"), ("1", "g")],
     ["every 6 hours", "every 4 hours", "as needed", "four times daily"],
     ["fever", "headache", "osteoarthritis pain"]),
    ("oxycodone", ["Roxicodone"], "tab", ["PO", "by mouth"],
     [("5", "mg"), ("10", "mg")], ["every 4 hours", "every 6 hours", "as needed"],
     ["post-operative pain", "fracture pain"]),
    ("tramadol", ["Ultram"], "tab", ["PO", "by mouth"],
     [("50", "mg"), ("100", "mg")], ["every 6 hours", "as needed", "twice daily"],
     ["chronic back pain", "osteoarthritis pain"]),
    ("hydrochlorothiazide", ["Microzide"], "tab", ["PO", "by mouth"],
     [("12.5", "mg"), ("25", "mg")], ["once daily", "every morning"],
     ["hypertension"]),
    ("furosemide", ["Lasix"], "tab", ["PO", "IV"],
     [("20", "mg"), ("40", "mg"), ("80", "mg")], ["once daily", "twice daily", "every morning"],
     ["heart failure", "leg edema"]),
    ("spironolactone", ["Aldactone"], "tab", ["PO", "by mouth"],
     [("12.5", "mg"), ("25", "mg"), ("50", "mg")], ["once daily"],
     ["heart failure", "ascites"]),
    ("warfarin", ["Coumadin"], "tab", ["PO", "in the evening"],
     [("1", "mg"), ("2", "mg"), ("2.5", "mg"), ("5", "mg"), ("7.5", "mg")], ["once daily"],
     ["atrial fibrillation", "deep vein thrombosis"]),
    ("apixaban", ["Eliquis"], "tab", ["PO", "by mouth"],
     [("2.5", "mg"), ("5", "mg")], ["twice daily", "every 12 hours"],
     ["atrial fibrillation", "pulmonary embolism"]),
    ("clopidogrel", ["Plavix"], "tab", ["PO", "by mouth"],
     [("75", "mg")], ["once daily"],
     ["recent stent placement", "ischemic stroke"]),
    ("digoxin", ["Lanoxin"], "tab", ["PO", "by mouth"],
     [("0.125", "mg"), ("0.25", "mg"), ("125", "mcg"), ("62.5", "mcg")], ["once daily", "every other day"],
     ["atrial fibrillation", "heart failure"]),
    ("insulin glargine", ["Lantus"], "inj", ["subcut", "SC", "subcutaneously"],
     [("10", "units"), ("14", "units"), ("20", "units"), ("24", "units"), ("30", "units")],
     ["once daily", "at bedtime"],
     ["type 2 diabetes", "type 1 diabetes"]),
    ("insulin lispro", ["Humalog"], "inj", ["subcut", "SC", "with meals"],
     [("4", "units"), ("6", "units"), ("8", "units"), ("10", "units")], ["three times daily"],
     ["type 1 diabetes"]),
    ("heparin", [], "inj", ["subcut", "SC"],
     [("5000", "units"), ("7500", "units")], ["every 8 hours", "every 12 hours"],
     ["DVT prophylaxis"]),
    ("enoxaparin", ["Lovenox"], "inj", ["subcut", "SC"],
     [("40", "mg"), ("60", "mg"), ("80", "mg")], ["once daily", "every 12 hours"],
     ["DVT prophylaxis", "deep vein thrombosis"]),
    ("alendronate", ["Fosamax"], "tab", ["PO", "with a full glass of water"],
     [("35", "mg"), ("70", "mg")], ["once weekly"],
     ["osteoporosis"]),
    ("methotrexate", ["Trexall"], "tab", ["PO", "by mouth"],
     [("7.5", "mg"), ("10", "mg"), ("15", "mg"), ("20", "mg")], ["once weekly"],
     ["rheumatoid arthritis", "psoriasis"]),
    ("cholecalciferol", [], "tab", ["PO", "with food"],
     [("1000", "units"), ("2000", "units"), ("50000", "units")], ["once daily", "once weekly"],
     ["vitamin D deficiency"]),
    ("montelukast", ["Singulair"], "tab", ["PO", "by mouth"],
     [("4", "mg"), ("10", "mg")], ["at bedtime", "once daily"],
     ["asthma", "allergic rhinitis"]),
    ("cetirizine", ["Zyrtec"], "tab", ["PO", "by mouth"],
     [("5", "mg"), ("10", "mg")], ["once daily", "as needed"],
     ["allergic rhinitis", "urticaria"]),
    ("tamsulosin", ["Flomax"], "tab", ["PO", "after dinner"],
     [("0.4", "mg"), ("0.8", "mg")], ["once daily", "at bedtime"],
     ["benign prostatic hyperplasia"]),
    ("ondansetron", ["Zofran"], "tab", ["PO", "IV"],
     [("4", "mg"), ("8", "mg")], ["every 8 hours", "as needed", "every 6 hours"],
     ["nausea", "chemotherapy-induced nausea"]),
    ("lorazepam", ["Ativan"], "tab", ["PO", "by mouth"],
     [("0.5", "mg"), ("1", "mg")], ["as needed", "at bedtime", "twice daily"],
     ["panic disorder", "insomnia with anxiety"]),
    ("trazodone", ["Desyrel"], "tab", ["PO", "by mouth"],
     [("25", "mg"), ("50", "mg"), ("100", "mg")], ["at bedtime"],
     ["insomnia"]),
    ("allopurinol", ["Zyloprim"], "tab", ["PO", "by mouth"],
     [("100", "mg"), ("300", "mg")], ["once daily"],
     ["gout", "hyperuricemia"]),
    ("colchicine", ["Colcrys"], "tab", ["PO", "by mouth"],
     [("0.6", "mg")], ["once daily", "twice daily"],
     ["gout flare", "pericarditis"]),
    ("ferrous sulfate", [], "tab", ["PO", "with orange juice"],
     [("325", "mg")], ["once daily", "every other day", "twice daily"],
     ["iron deficiency anemia"]),
    ("lactulose", ["Enulose"], "liq", ["PO", "by mouth"],
     [("15", "mL"), ("20", "mL"), ("30", "mL")], ["twice daily", "three times daily", "once daily"],
     ["hepatic encephalopathy", "chronic constipation"]),
    ("albuterol", ["Ventolin"], "liq", ["via nebulizer", "nebulized"],
     [("2.5", "mg")], ["every 4 hours", "every 6 hours", "as needed"],
     ["asthma", "COPD"]),
    ("ceftriaxone", ["Rocephin"], "inj", ["IV", "IM"],
     [("1", "g"), ("2", "g"), ("500", "mg")], ["once daily", "every 12 hours"],
     ["pneumonia", "pyelonephritis"]),
    ("vancomycin", ["Vancocin"], "inj", ["IV"],
     [("1", "g"), ("1.25", "g"), ("1.5", "g")], ["every 12 hours", "every 8 hours"],
     ["MRSA bacteremia", "cellulitis"]),
    ("valacyclovir", ["Valtrex"], "tab", ["PO", "by mouth"],
     [("500", "mg"), ("1", "g")], ["twice daily", "three times daily", "once daily"],
     ["herpes zoster", "genital herpes"]),
]

# --------------------------------------------------------------------------------------------
# Distractor material.
# --------------------------------------------------------------------------------------------
STOP_REASONS = ["cough", "dizziness", "nausea", "a rash", "cost", "lack of effect", "fatigue",
                "ankle swelling", "low potassium", "muscle aches", "GI upset", "bradycardia"]
ALLERGIES = ["NKDA", "allergic to sulfa", "allergy: codeine", "allergic to latex",
             "allergic to shellfish", "allergic to penicillin", "allergy: aspirin"]
BETA_LACTAMS = {"amoxicillin", "cephalexin", "ceftriaxone"}
REPORTS = ["reports good adherence", "denies chest pain", "feels better than last week",
           "reports poor sleep", "has no new complaints", "reports mild headaches",
           "asks about side effects", "walks 30 minutes a day"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
SEXES = [("man", "M"), ("woman", "F"), ("male", "M"), ("female", "F")]

# --------------------------------------------------------------------------------------------
# Note templates (at least 15). Slots: {intro} "58-year-old man with X", {age}, {sex}, {sx} (M/F),
# {cond}, {date}, {vitals} (inline), {lab} (inline), {stop} (inline clause), {allergy},
# {report}, {weeks}, {rx} (the prescription clause). A capitalised slot ({Rx}, {Stop}, ...)
# starts a sentence.
# --------------------------------------------------------------------------------------------
TEMPLATES = [
    "{Intro}, {vitals}. {Rx}.",
    "{Intro}. {Stop}; {rx}.",
    "Seen on {date} for {cond}; {lab}. {Rx}.",
    "{Rx}. {Intro}, {vitals}.",
    "Follow-up {date}: {cond}, {lab}, {vitals}. {Rx}.",
    "{Intro}, {allergy}. {Rx}, {stop}.",
    "Assessment: {cond}, {lab}. Plan: {rx}. {Stop}.",
    "{age}yo {sx} with {cond}, {vitals}. {Rx}.",
    "Telephone note {date}: patient with {cond} {report}. {Rx}.",
    "Discharge summary: {age}-year-old {sex} admitted {date} with {cond}. {Rx}; {stop}.",
    "{Intro}, weight {wt} kg. {Lab}. {Rx}.",
    "Pt {age} {sx}, {cond}, {vitals}, {lab}; {rx}.",
    "Medication change on {date}: {stop}, {rx}. Vitals stable, {vitals}.",
    "{Rx}. Reason: {cond}. Next review in {weeks} weeks, {lab}.",
    "Clinic visit for {cond} in {art} {age}-year-old {sex}. {Lab}, {vitals}. {Rx}.",
    "HPI: {age} y/o {sx} with {cond}, {allergy}. {Rx} and recheck in {weeks} weeks.",
    "Note {date}. {Intro}, {vitals}; {rx}.",
    "{Intro}, who {report}. {Stop}, {vitals}. {Rx}.",
    "ED visit {date}, {age}-year-old {sex}, {cond}. {Lab}; {allergy}. {Rx}.",
    "{Intro}; {lab}, {vitals}. {Rx}, then follow up in {weeks} weeks.",
]

# Prescription clauses. {D} drug text, {d} dose text, {f} frequency text, {r} route text,
# {d_old} another dose of the same drug, {old} the stopped drug. Tags: "tab" only for tablet
# forms; "up"/"down" need a smaller/larger second dose; "old" uses the stopped drug.
RX_CLAUSES = [
    ("start {D} {d} {r}{f}", ""),
    ("begin {D} {d} {f}", ""),
    ("Rx: {D} {d} {r}{f}", ""),
    ("will initiate {D} at {d} {f}", ""),
    ("prescribed {D} {d} tabs, 1 tab {f}", "tab"),
    ("take {D} {d}, one tablet {r}{f}", "tab"),
    ("continue {D} {d} {f}", ""),
    ("{D} {d} {f} started today", ""),
    ("discharged on {D} {d} {r}{f}", ""),
    ("increase {D} from {d_old} to {d} {f}", "up"),
    ("reduce {D} from {d_old} to {d} {f}", "down"),
    ("switched from {old} to {D} {d} {f}", "old"),
    ("new med: {D} {d} {f}", ""),
    ("sig: {D} {d} {r}{f}", ""),
    ("ordered {D} {d} {r}{f}", ""),
    ("{D} {d} {f}, dispense #{n}, {refills} refills", ""),
    ("plan is {D} {d} {f} for {days} days", ""),
    ("patient to take {D} {d} {f}", ""),
]

# Clauses to which a stop clause would be redundant (they already name the stopped drug).
STOP_CLAUSES = [
    "stopped {old} due to {reason}",
    "{old} discontinued ({reason})",
    "off {old} since {date2}",
    "stopped {old} {old_dose} because of {reason}",
    "d/c'd {old} after {reason}",
    "previous {old} {old_dose} was stopped",
]

LABS = [
    ("A1c {}%", lambda r: f"{r.uniform(5.6, 11.2):.1f}"),
    ("LDL {} mg/dL", lambda r: str(r.randint(70, 190))),
    ("Cr {} mg/dL", lambda r: f"{r.uniform(0.6, 2.1):.1f}"),
    ("K {} mmol/L", lambda r: f"{r.uniform(3.2, 5.4):.1f}"),
    ("TSH {} mIU/L", lambda r: f"{r.uniform(0.3, 9.8):.1f}"),
    ("INR {}", lambda r: f"{r.uniform(0.9, 3.4):.1f}"),
    ("Hb {} g/dL", lambda r: f"{r.uniform(8.5, 15.5):.1f}"),
    ("eGFR {}", lambda r: str(r.randint(28, 105))),
    ("glucose {} mg/dL", lambda r: str(r.randint(78, 310))),
    ("WBC {}", lambda r: f"{r.uniform(3.9, 16.8):.1f}"),
]


def canon_number(value: str) -> str:
    """'1,000' -> '1000', '0.40' -> '0.4', '.5' -> '0.5', '12.50' -> '12.5'."""
    d = Decimal(value.replace(",", ""))
    text = format(d.normalize(), "f")
    return text


def render_number(r: random.Random, value: str) -> str:
    d = Decimal(value)
    x = r.random()
    if d >= 1000 and d == d.to_integral_value() and x < 0.5:
        return f"{int(d):,}"
    if d < 1 and x < 0.15:
        return value[1:]  # ".5"
    if "." in value and x > 0.9:
        return value + "0"  # "0.40"
    return value


def render_dose(r: random.Random, value: str, unit: str) -> str:
    num = render_number(r, value)
    u = r.choice(UNITS[unit])
    space = " " if (len(u) > 3 or r.random() < 0.65) else ""
    return f"{num}{space}{u}"


def render_drug(r: random.Random, generic: str, brands: list[str]) -> str:
    x = r.random()
    if brands and x < 0.08:
        return f"{r.choice(brands)} ({generic})"
    if brands and x < 0.14:
        return f"{generic} ({r.choice(brands)})"
    if x < 0.30:
        return generic.title()
    if x < 0.34:
        return generic.upper()
    return generic


def render_date(r: random.Random) -> str:
    y, m, d = r.randint(2021, 2025), r.randint(1, 12), r.randint(1, 28)
    style = r.randrange(4)
    if style == 0:
        return f"{m:02d}/{d:02d}/{y}"
    if style == 1:
        return f"{y}-{m:02d}-{d:02d}"
    if style == 2:
        return f"{d} {MONTHS[m - 1]} {y}"
    return f"{MONTHS[m - 1]} {d}"


def render_vitals(r: random.Random) -> str:
    parts = [f"BP {r.randint(104, 168)}/{r.randint(62, 98)}", f"HR {r.randint(56, 104)}"]
    extra = r.random()
    if extra < 0.3:
        parts.append(f"T {r.uniform(36.3, 38.4):.1f} C")
    elif extra < 0.5:
        parts.append(f"SpO2 {r.randint(92, 99)}%")
    elif extra < 0.6:
        parts.append(f"RR {r.randint(12, 22)}")
    return ", ".join(parts)


def render_lab(r: random.Random) -> str:
    picks = r.sample(LABS, 2 if r.random() < 0.35 else 1)
    return ", ".join(fmt.format(gen(r)) for fmt, gen in picks)


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_example(r: random.Random) -> tuple[str, dict, tuple]:
    """One (note, answer, combo) triple; combo is (drug, frequency phrasing) for the split check."""
    if r.random() < 0.4:
        # frequency class first, so that the rarer classes are not drowned by "once daily"
        freq = r.choice(list(FREQUENCIES))
        generic, brands, form, routes, doses, freqs, conds = r.choice([e for e in DRUGS if freq in e[5]])
    else:
        generic, brands, form, routes, doses, freqs, conds = r.choice(DRUGS)
        freq = r.choice(freqs)
    value, unit = r.choice(doses)
    freq_text = r.choice(FREQUENCIES[freq])

    # pick a prescription clause that fits this drug
    while True:
        clause, tag = r.choice(RX_CLAUSES)
        if tag == "tab" and form != "tab":
            continue
        same_unit = [v for v, u in doses if u == unit]
        if tag == "up" and not any(Decimal(v) < Decimal(value) for v in same_unit):
            continue
        if tag == "down" and not any(Decimal(v) > Decimal(value) for v in same_unit):
            continue
        break
    d_old = ""
    if tag == "up":
        d_old = render_dose(r, r.choice([v for v in same_unit if Decimal(v) < Decimal(value)]), unit)
    elif tag == "down":
        d_old = render_dose(r, r.choice([v for v in same_unit if Decimal(v) > Decimal(value)]), unit)

    # the stopped drug: a different one, named in a stop clause and/or the rx clause
    old_entry = r.choice([e for e in DRUGS if e[0] != generic])
    old = old_entry[0] if r.random() < 0.8 else old_entry[0].title()
    ov, ou = r.choice(old_entry[4])
    old_dose = render_dose(r, ov, ou)

    route = ""
    if "{r}" in clause and r.random() < 0.45:
        route = r.choice(routes) + " "

    rx = clause.format(
        D=render_drug(r, generic, brands),
        d=render_dose(r, value, unit),
        f=freq_text,
        r=route,
        d_old=d_old,
        old=old,
        n=r.choice([7, 10, 14, 20, 28, 30, 60, 90]),
        refills=r.choice([0, 1, 2, 3, 5]),
        days=r.choice([3, 5, 7, 10, 14]),
    )
    stop = r.choice(STOP_CLAUSES).format(
        old=old, reason=r.choice(STOP_REASONS), date2=render_date(r), old_dose=old_dose
    )
    sex, sx = r.choice(SEXES)
    age = r.randint(19, 92)
    cond = r.choice(conds)
    art = "an" if str(age).startswith("8") or age in (11, 18) else "a"
    intro_style = r.randrange(3)
    if intro_style == 0:
        intro = f"{age}-year-old {sex} with {cond}"
    elif intro_style == 1:
        intro = f"{age} y/o {sx} with history of {cond}"
    else:
        intro = f"patient is {art} {age}-year-old {sex} followed for {cond}"
    allergy = r.choice([a for a in ALLERGIES if not (generic in BETA_LACTAMS and "penicillin" in a)])
    lab = render_lab(r)

    template = r.choice(TEMPLATES)
    if tag == "old" and ("{Stop}" in template or "{stop}" in template):
        # avoid naming the stopped drug twice in two different ways
        stop_txt = f"{old} was not tolerated"
    else:
        stop_txt = stop
    slots = dict(
        intro=intro, Intro=cap(intro), art=art, age=age, sex=sex, sx=sx, cond=cond, date=render_date(r),
        vitals=render_vitals(r), lab=lab, Lab=cap(lab), stop=stop_txt, Stop=cap(stop_txt),
        allergy=allergy, report=r.choice(REPORTS), weeks=r.choice([2, 4, 6, 8, 12]),
        wt=r.randint(48, 121), rx=rx, Rx=cap(rx),
    )
    note = template.format(**slots).replace("..", ".")
    answer = {"medication": generic, "dose": f"{canon_number(value)} {unit}", "frequency": freq}
    return note, answer, (generic, freq_text)


def generate(seed: int) -> tuple[list[dict], list[dict]]:
    r = random.Random(seed)
    seen_notes: set[str] = set()
    train_combos: set[tuple] = set()
    train_classes: set[tuple] = set()
    train: list[dict] = []
    evals: list[dict] = []
    while len(train) < N_TRAIN or len(evals) < N_EVAL:
        note, answer, combo = make_example(r)
        if not (MIN_WORDS <= len(note.split()) <= MAX_WORDS) or note in seen_notes:
            continue
        # Interleave: every 6th accepted example goes to eval once train has a head start, and
        # an eval example must have its (drug, canonical frequency) class seen in train.
        want_eval = len(train) >= 200 and len(evals) < N_EVAL and (
            len(train) >= N_TRAIN or (len(train) + len(evals)) % 6 == 5
        )
        if want_eval:
            if (answer["medication"], answer["frequency"]) not in train_classes:
                continue
            split, bucket = "eval", evals
        else:
            if len(train) >= N_TRAIN:
                continue
            split, bucket = "train", train
            train_combos.add(combo)
            train_classes.add((answer["medication"], answer["frequency"]))
        seen_notes.add(note)
        bucket.append({
            "id": f"med-{split}-{len(bucket):05d}",
            "instruction": INSTRUCTION,
            "input": note,
            "output": json.dumps(answer, ensure_ascii=False),
            "_combo": combo,
        })
    return train, evals


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            clean = {k: v for k, v in row.items() if not k.startswith("_")}
            fh.write(json.dumps(clean, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=os.path.join("data", "demo"))
    args = ap.parse_args()

    train, evals = generate(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "task_train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "task_eval.jsonl"), evals)

    train_combos = {row["_combo"] for row in train}
    shared = sum(row["_combo"] in train_combos for row in evals)
    print(f"wrote {len(train)} train and {len(evals)} eval examples to {args.out_dir} "
          f"(seed {args.seed}; {shared}/{len(evals)} eval examples share a drug x frequency "
          f"phrasing with train)")


if __name__ == "__main__":
    main()
