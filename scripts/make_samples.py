"""Generate the invented sample rows under alora_ds/data/samples/ (deterministic).

Usage: python scripts/make_samples.py alora_ds/data/samples

All text is made up from the word lists below; nothing is copied from any dataset.
"""

import json
import random
import sys
from pathlib import Path

OUT = Path(sys.argv[1])
SIZES = (46, 33, 22)  # minimum rows for train, dev, test; whole groups are kept together

FIRST = [
    "Maria",
    "Tomas",
    "Anika",
    "Jonas",
    "Leila",
    "Pavel",
    "Ines",
    "Kofi",
    "Hana",
    "Marta",
    "Oskar",
    "Nadia",
    "Felix",
    "Amara",
    "Ruben",
    "Elin",
    "Yusuf",
    "Clara",
    "Dmitri",
    "Sofia",
    "Arjun",
    "Greta",
    "Mateo",
    "Noor",
]
LAST = [
    "Lindqvist",
    "Okafor",
    "Brenner",
    "Castell",
    "Moreau",
    "Hayashi",
    "Novak",
    "Duarte",
    "Halvorsen",
    "Mensah",
    "Kowal",
    "Ferreira",
    "Sandoval",
    "Albrecht",
    "Varga",
    "Petrov",
    "Lund",
    "Rossetti",
    "Whitlock",
    "Quint",
]
WOMEN = [
    "Maria",
    "Anika",
    "Leila",
    "Ines",
    "Hana",
    "Marta",
    "Nadia",
    "Amara",
    "Elin",
    "Clara",
    "Sofia",
    "Greta",
    "Noor",
]
CITIES = [
    "Marrowby",
    "Eastfold",
    "Tarnholm",
    "Valsaro",
    "Brightwater",
    "Kestrel Point",
    "Drummore",
    "Lindenport",
    "Casterwick",
    "Pellham",
    "Saltmere",
    "Corvale",
    "Ashgrove",
    "Fennick",
    "Wrenford",
    "Halden Cross",
]
RIVERS = [
    "Osk",
    "Tamber",
    "Vell",
    "Corrin",
    "Ashby",
    "Mardle",
    "Sorrel",
    "Kest",
    "Ibber",
    "Dunmore",
]
ORGS = [
    "Northwind Bank",
    "Halcyon Motors",
    "Bluefield Foods",
    "Cartwright Energy",
    "Meridian Air",
    "Solace Pharmaceuticals",
    "Tidewater Shipping",
    "Greystone Steel",
    "Lumen Telecom",
    "Orchard Retail",
]
SMALL_ORGS = [
    "Pixelmoss",
    "Brightloop",
    "Codewell",
    "Quillsoft",
    "Nimbus Labs",
    "Tinkerbyte",
    "Lattice Works",
    "Fernwave",
]
TEAMS = [
    "Marrowby Rovers",
    "Eastfold United",
    "Tarnholm City",
    "Valsaro Athletic",
    "Saltmere Town",
    "Corvale Wanderers",
    "Ashgrove Albion",
    "Fennick Harriers",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def person(rng):
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def write(task, rows_by_split):
    folder = OUT / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in zip(("train", "dev", "test"), rows_by_split, strict=True):
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(task, split, len(rows))


def split_groups(groups):
    """Fill train, dev, test in turn with whole groups (e.g. all questions on one passage)."""
    out, i = [], 0
    for size in SIZES:
        rows = []
        while len(rows) < size:
            rows.extend(groups[i])
            i += 1
        out.append(rows)
    return out


def unique_groups(make, rng, key, count):
    """Call make(rng) until `count` groups with distinct keys exist."""
    seen, groups = set(), []
    while len(groups) < count:
        group = make(rng)
        k = key(group)
        if group and k not in seen:
            seen.add(k)
            groups.append(group)
    return groups


# ----------------------------------------------------------------------------------------- sst2
POS_ADJ = [
    "wonderful",
    "delightful",
    "moving",
    "hilarious",
    "charming",
    "brilliant",
    "heartfelt",
    "gripping",
    "funny",
    "smart",
    "touching",
    "superb",
    "inventive",
    "joyous",
    "engaging",
    "lovely",
    "memorable",
    "excellent",
    "gorgeous",
    "warm",
    "witty",
    "beautiful",
]
NEG_ADJ = [
    "dull",
    "tedious",
    "boring",
    "clumsy",
    "lifeless",
    "awful",
    "pointless",
    "predictable",
    "flat",
    "terrible",
    "forgettable",
    "bland",
    "annoying",
    "incoherent",
    "shallow",
    "tiresome",
    "dreary",
    "stale",
    "unfunny",
    "muddled",
    "ugly",
    "lazy",
]
POS_PHRASE = [
    "a pleasure to watch",
    "a real triumph",
    "sharply written",
    "beautifully acted",
    "full of life",
    "worth every minute",
    "a joy from start to finish",
]
NEG_PHRASE = [
    "a chore to sit through",
    "a complete mess",
    "painfully slow",
    "poorly acted",
    "a waste of time",
    "badly written",
    "hard to care about",
]
SUBJ = [
    "the film",
    "this movie",
    "the story",
    "the cast",
    "the script",
    "the performances",
    "the direction",
    "the dialogue",
    "the ending",
    "the soundtrack",
    "the whole thing",
    "the director 's new picture",
    "the lead actress",
    "the second half",
]
NOUN = ["film", "movie", "comedy", "drama", "thriller", "debut", "picture", "story", "romance"]
SST_PATTERNS = [
    "{subj} is {a} and {b} .",
    "a {a} , {b} {noun} .",
    "{subj} is {p} .",
    "it 's {a} from start to finish .",
    "{subj} feels {a} , and {subj2} is {b} .",
    "what a {a} {noun} .",
    "i found {subj} {a} and {b} .",
    "{subj} is simply {a} ; {p} .",
    "an utterly {a} {noun} that is {p} .",
    "even {subj2} is {a} .",
]


def sst2():
    rng = random.Random(2)
    seen, rows = set(), []
    while len(rows) < 110:
        label = len(rows) % 2  # balanced: 0 = negative, 1 = positive
        adj, phrases = (POS_ADJ, POS_PHRASE) if label else (NEG_ADJ, NEG_PHRASE)
        a, b = rng.sample(adj, 2)
        subj, subj2 = rng.sample(SUBJ, 2)
        text = rng.choice(SST_PATTERNS).format(
            subj=subj, subj2=subj2, a=a, b=b, p=rng.choice(phrases), noun=rng.choice(NOUN)
        )
        text = text.replace("a a", "an a").replace("a e", "an e").replace("a i", "an i")
        text = text.replace("a u", "an u").replace("a o", "an o")
        if text not in seen:
            seen.add(text)
            rows.append({"sentence": text, "label": label})
    write("sst2", split_groups([[r] for r in rows]))


# ------------------------------------------------------------------------------------------ rte
def rte_item(rng):
    p, org, org2 = person(rng), rng.choice(ORGS), rng.choice(SMALL_ORGS)
    c1, c2 = rng.sample(CITIES, 2)
    y, y2 = rng.sample(range(1998, 2022), 2)
    n = rng.choice([12, 40, 75, 120, 300])
    frame = rng.randrange(6)
    if frame == 0:
        s1 = (
            f"{p}, who became chief executive of {org} in {y}, said on {rng.choice(DAYS)} "
            f"that the company will open a new factory in {c1}."
        )
        ent = [f"{p} is the chief executive of {org}.", f"{org} plans to open a factory in {c1}."]
        non = [
            f"{org} will close its factory in {c1}.",
            f"{p} became chief executive of {org} in {y2}.",
            f"{p} founded {org}.",
        ]
    elif frame == 1:
        art = rng.choice(["bronze helmet", "wooden boat", "stone altar", "silver coin hoard"])
        age = rng.choice([1500, 2000, 2800, 3200])
        s1 = (
            f"Archaeologists from the University of {c1} have uncovered a {age}-year-old "
            f"{art} near the village of {c2}."
        )
        ent = [f"A {art} was found near {c2}.", f"The {art} is about {age} years old."]
        non = [
            f"The {art} was found in a museum in {c1}.",
            f"The {art} was made last century.",
            f"Archaeologists lost a {art} near {c2}.",
        ]
    elif frame == 2:
        r = rng.choice(RIVERS)
        s1 = (
            f"Heavy rain caused the {r} River to flood on {rng.choice(DAYS)}, forcing {n} "
            f"families in {c1} to leave their homes."
        )
        ent = [f"The {r} River flooded.", f"Families in {c1} left their homes."]
        non = [
            f"The {r} River dried up.",
            f"No one in {c1} had to leave home.",
            f"The flood was caused by a broken dam in {c2}.",
        ]
    elif frame == 3:
        t1, t2 = rng.sample(TEAMS, 2)
        s1 = f"{t1} beat {t2} 3-1 on Saturday to win the {c2} Cup for the first time since {y}."
        ent = [f"{t1} won the {c2} Cup.", f"{t2} lost to {t1}."]
        non = [
            f"{t2} won the {c2} Cup.",
            f"{t1} had never won the {c2} Cup before.",
            "The match ended in a draw.",
        ]
    elif frame == 4:
        s1 = (
            f"{org} agreed to buy {org2}, a small software firm based in {c1}, for {n} "
            f"million dollars."
        )
        ent = [f"{org} is buying {org2}.", f"{org2} is based in {c1}."]
        non = [
            f"{org2} is buying {org}.",
            f"{org2} is based in {c2}.",
            f"{org2} is a large steel company.",
        ]
    else:
        title = rng.choice(
            [
                "The Quiet Harbour",
                "Salt and Lantern",
                "A House of Wind",
                "The Ninth Winter",
                "Paper Rivers",
                "The Orchard Keeper's Son",
            ]
        )
        s1 = (
            f"The novel {title}, written by {p}, won the {c2} Prize last week; it tells the "
            f"story of a lighthouse keeper in {c1}."
        )
        ent = [f"{p} wrote {title}.", f"{title} won a prize."]
        non = [
            f"{title} is a film about a lighthouse.",
            f"{p} is a lighthouse keeper.",
            f"{title} lost the {c2} Prize.",
        ]
    label = rng.randrange(2)  # 0 = entailment, 1 = not_entailment
    return [{"sentence1": s1, "sentence2": rng.choice(non if label else ent), "label": label}]


def rte():
    groups = unique_groups(rte_item, random.Random(3), lambda g: g[0]["sentence1"], 110)
    write("rte", split_groups(groups))


# ----------------------------------------------------------------------------------------- qnli
PRODUCTS = ["cheese", "pottery", "apple", "wool", "lantern", "honey", "chestnut", "glass"]
INVENTIONS = [
    "pocket barometer",
    "electric kiln",
    "folding microscope",
    "solar water pump",
    "tide-powered clock",
    "paper battery",
]
FIELDS = ["chemistry", "physics", "botany", "engineering", "astronomy"]


def qnli_topic(rng):
    if rng.randrange(2):
        t, r, lake = rng.choice(CITIES), rng.choice(RIVERS), rng.choice(CITIES)
        y, n, prod = rng.randrange(1150, 1850), rng.randrange(8, 90) * 1000, rng.choice(PRODUCTS)
        return [
            (
                f"What river runs through {t}?",
                f"{t} lies on the banks of the {r}, which flows south into Lake {lake}.",
            ),
            (
                f"When was {t} founded?",
                f"The town of {t} was founded in {y} by fishermen from the coast.",
            ),
            (
                f"What is {t} known for?",
                f"{t} is best known for its {prod} market, held every autumn.",
            ),
            (
                f"How many people live in {t}?",
                f"According to the last census, about {n:,} people live in {t}.",
            ),
        ]
    s = person(rng)
    c1, c2, c3 = rng.sample(CITIES, 3)
    y, field, inv = rng.randrange(1820, 1950), rng.choice(FIELDS), rng.choice(INVENTIONS)
    return [
        (f"Where was {s} born?", f"{s} was born in {c1} in {y} and later moved to {c2}."),
        (f"What did {s} invent?", f"In {y + 31}, {s} built the first working {inv}."),
        (
            f"Which university did {s} teach at?",
            f"{s} taught {field} at the University of {c3} for twenty years.",
        ),
        (
            f"What subject did {s} teach?",
            f"{s} taught {field} at the University of {c3} for twenty years.",
        ),
    ]


def qnli():
    rng = random.Random(4)
    seen, rows = set(), []
    while len(rows) < 110:
        facts = qnli_topic(rng)
        i = rng.randrange(len(facts))
        question, answer = facts[i]
        label = len(rows) % 2  # 0 = entailment, 1 = not_entailment
        others = [s for _, s in facts if s != answer]
        sentence = rng.choice(others) if label else answer
        if (question, sentence) not in seen:
            seen.add((question, sentence))
            rows.append({"question": question, "sentence": sentence, "label": label})
    write("qnli", split_groups([[r] for r in rows]))


# ---------------------------------------------------------------------------------------- boolq
BIRDS = ["ridge finch", "amber warbler", "crested lark", "pine chat", "dusk wren", "cliff bunting"]
GAMES = ["Kettle", "Snapjack", "Lanterns", "Crown and Anchor Rummy", "Ferry", "Quill"]
SHOWS = ["Harbour Lights", "The Long Table", "Wrenford Hall", "Salt Road", "North of Corvale"]
NETWORKS = ["Channel Nine", "BlueSky TV", "the Civic network", "Orbit One"]


def boolq_passage(rng):
    kind = rng.randrange(4)
    if kind == 0:
        lake, r, r2 = rng.choice(CITIES), *rng.sample(RIVERS, 2)
        freezes = rng.randrange(2)
        size, depth = rng.randrange(20, 400), rng.randrange(15, 120)
        passage = (
            f"Lake {lake} is a freshwater lake in the northern hills. It covers about "
            f"{size} square kilometres and reaches a depth of {depth} metres. "
            + (
                "The lake freezes over in most winters, and skating on it is popular. "
                if freezes
                else "Because of warm springs, the lake rarely freezes, even "
                "in the coldest winters. "
            )
            + f"It is fed mainly by the {r} River."
        )
        ln = lake.lower()
        qs = [
            (f"is lake {ln} a freshwater lake", True),
            (f"is lake {ln} a saltwater lake", False),
            (f"does lake {ln} freeze in winter", bool(freezes)),
            (f"is lake {ln} fed by the {r.lower()} river", True),
            (f"is lake {ln} fed by the {r2.lower()} river", False),
        ]
    elif kind == 1:
        game = rng.choice(GAMES)
        cards, jokers = rng.choice([5, 7, 9]), rng.randrange(2)
        passage = (
            f"{game} is a card game for two to four players. Each player starts with "
            f"{cards} cards, and the first player to get rid of all of them wins the "
            "round. The game is played with a standard deck "
            + (
                "including both jokers, which act as wild cards."
                if jokers
                else "with the jokers removed."
            )
        )
        g = game.lower()
        other = rng.choice([c for c in (5, 7, 9) if c != cards])
        qs = [
            (f"do you start with {cards} cards in {g}", True),
            (f"do you start with {other} cards in {g}", False),
            (f"can six people play {g}", False),
            (f"is {g} played with jokers", bool(jokers)),
            (f"is {g} a card game", True),
        ]
    elif kind == 2:
        bird, region = rng.choice(BIRDS), rng.choice(CITIES)
        migrates = rng.randrange(2)
        passage = (
            f"The {bird} is a small songbird found in the mountain forests around "
            f"{region}. It feeds mostly on insects and seeds. "
            + (
                "Each autumn it migrates south to spend the winter near the coast. "
                if migrates
                else "Unlike many of its relatives, it does not migrate and "
                "stays in the forest all winter. "
            )
            + "Males have a bright red throat, while females are plain brown."
        )
        qs = [
            (f"does the {bird} migrate in winter", bool(migrates)),
            (f"do male {bird}s have a red throat", True),
            (f"does the {bird} eat insects", True),
            (f"is the {bird} found in deserts", False),
            (f"are female {bird}s bright red", False),
        ]
    else:
        show, net = rng.choice(SHOWS), rng.choice(NETWORKS)
        seasons, y, film = rng.randrange(3, 9), rng.randrange(1995, 2015), rng.randrange(2)
        passage = (
            f"{show} is a drama series that ran for {seasons} seasons on {net} from "
            f"{y} to {y + seasons - 1}. The show follows a family running a small hotel "
            f"in {rng.choice(CITIES)}. "
            + (
                f"A feature film continuing the story was released in {y + seasons + 2}."
                if film
                else "A film version was announced but never made."
            )
        )
        s = show.lower()
        qs = [
            (f"is there a movie of {s}", bool(film)),
            (f"did {s} run for {seasons} seasons", True),
            (f"did {s} run for {seasons + 2} seasons", False),
            (f"is {s} about a family running a hotel", True),
            (f"is {s} a comedy about a football team", False),
        ]
    picked = rng.sample(qs, 2)
    return [{"passage": passage, "question": q, "label": a} for q, a in picked]


def boolq():
    groups = unique_groups(boolq_passage, random.Random(5), lambda g: g[0]["passage"], 60)
    write("boolq", split_groups(groups))


# ----------------------------------------------------------------------------------------- copa
# (premise, right cause, wrong cause, right effect, wrong effect)
COPA_EVENTS = [
    (
        "The man broke his toe.",
        "He dropped a hammer on his foot.",
        "He got a hole in his sock.",
        "He limped to the doctor.",
        "He went for a long run.",
    ),
    (
        "The girl's ice cream melted.",
        "She left it in the sun.",
        "She ate it with a spoon.",
        "Her hands got sticky.",
        "Her ice cream froze solid.",
    ),
    (
        "The baby started crying.",
        "His toy was taken away.",
        "His mother sang to him.",
        "His father picked him up.",
        "The neighbours fell asleep.",
    ),
    (
        "The road was covered in ice.",
        "The temperature dropped below freezing.",
        "The sun shone all afternoon.",
        "Several cars slid off the road.",
        "Drivers went faster than usual.",
    ),
    (
        "The woman lost her keys.",
        "She had a hole in her coat pocket.",
        "She bought a new keyring.",
        "She called a locksmith.",
        "She locked the front door.",
    ),
    (
        "The plant wilted.",
        "Nobody watered it for weeks.",
        "It was placed by a sunny window.",
        "Its leaves turned brown.",
        "It grew new flowers.",
    ),
    (
        "The students cheered.",
        "The teacher cancelled the exam.",
        "The teacher handed out homework.",
        "The noise echoed down the hall.",
        "The classroom fell silent.",
    ),
    (
        "The power went out.",
        "A storm knocked down a power line.",
        "The man switched on a lamp.",
        "The house went dark.",
        "The fridge kept running.",
    ),
    (
        "The boy was out of breath.",
        "He ran up the stairs.",
        "He sat on the sofa.",
        "He stopped to rest.",
        "He started to sing loudly.",
    ),
    (
        "The bread turned mouldy.",
        "It was left in the cupboard for two weeks.",
        "It was baked that morning.",
        "The family threw it away.",
        "The family made sandwiches.",
    ),
    (
        "The driver stopped the car.",
        "The traffic light turned red.",
        "The radio played a song.",
        "The passengers got out.",
        "The car sped up.",
    ),
    (
        "The child got a sunburn.",
        "She played outside without sunscreen.",
        "She wore a wide hat.",
        "Her shoulders turned red.",
        "Her skin became pale.",
    ),
    (
        "The crowd booed.",
        "The referee made an unfair call.",
        "The home team scored a goal.",
        "The referee looked away.",
        "The players shook hands.",
    ),
    (
        "The phone battery died.",
        "The woman forgot to charge it.",
        "The woman bought a new case.",
        "She could not call her friend.",
        "She sent three more messages.",
    ),
    (
        "The glass shattered.",
        "The boy knocked it off the table.",
        "The boy filled it with juice.",
        "Pieces flew across the floor.",
        "The juice stayed in the glass.",
    ),
    (
        "The man felt sleepy.",
        "He stayed up all night.",
        "He drank a glass of water.",
        "He took a nap.",
        "He went for a jog.",
    ),
    (
        "The river overflowed.",
        "It rained for five days.",
        "The fish swam upstream.",
        "The fields were flooded.",
        "The bridge was painted.",
    ),
    (
        "The dog barked.",
        "A stranger knocked at the door.",
        "The dog ate its dinner.",
        "The neighbours woke up.",
        "The cat fell asleep.",
    ),
    (
        "The tourist got lost.",
        "His map was out of date.",
        "He bought a postcard.",
        "He asked a stranger for directions.",
        "He posted a letter.",
    ),
    (
        "The soup was too salty.",
        "The cook added salt twice.",
        "The cook used fresh carrots.",
        "The guest drank a lot of water.",
        "The guest asked for more salt.",
    ),
    (
        "The woman sneezed.",
        "Dust flew up from the rug.",
        "She closed the window.",
        "Her friend said bless you.",
        "Her friend turned off the light.",
    ),
    (
        "The meeting was postponed.",
        "The manager was ill.",
        "The room had enough chairs.",
        "The staff went back to their desks.",
        "The staff gave a presentation.",
    ),
    (
        "The ice on the pond cracked.",
        "The boy stepped onto it.",
        "The sky was cloudy.",
        "The boy jumped back to the shore.",
        "The pond froze harder.",
    ),
    (
        "The shop closed early.",
        "The owner felt unwell.",
        "A customer bought some milk.",
        "Shoppers found the door locked.",
        "The shelves were restocked.",
    ),
    (
        "The man's shirt was wet.",
        "He was caught in the rain.",
        "He ironed it that morning.",
        "He changed into a dry one.",
        "He put on a scarf.",
    ),
    (
        "The cake burned.",
        "It was left in the oven too long.",
        "It was decorated with cream.",
        "Smoke filled the kitchen.",
        "The guests asked for a second slice.",
    ),
    (
        "The team lost the match.",
        "Their best player was injured.",
        "Their fans sang loudly.",
        "The coach looked disappointed.",
        "The players lifted the trophy.",
    ),
    (
        "The boy's tooth fell out.",
        "It had been loose for days.",
        "He brushed his hair.",
        "He put it under his pillow.",
        "He bought a new toothbrush.",
    ),
    (
        "The letter arrived late.",
        "The post office was on strike.",
        "The stamp was brightly coloured.",
        "The party invitation came after the party.",
        "The envelope was sealed.",
    ),
    (
        "The computer froze.",
        "Too many programs were open.",
        "The screen was cleaned.",
        "The woman restarted it.",
        "The woman printed a photo.",
    ),
    (
        "The girl won the race.",
        "She trained every morning.",
        "She forgot her shoes.",
        "She received a medal.",
        "She walked home slowly.",
    ),
    (
        "The milk smelled sour.",
        "It was past its date.",
        "It was kept in the fridge.",
        "The man poured it down the sink.",
        "The man added it to his tea.",
    ),
    (
        "The audience laughed.",
        "The comedian told a joke.",
        "The lights were dimmed.",
        "The comedian smiled.",
        "The audience left the theatre.",
    ),
    (
        "The tyre went flat.",
        "The cyclist rode over a nail.",
        "The cyclist wore a helmet.",
        "He pushed the bike home.",
        "He rode faster.",
    ),
    (
        "The kitten hid under the bed.",
        "It heard thunder.",
        "It drank some milk.",
        "The owner could not find it.",
        "The owner went to work.",
    ),
    (
        "The window fogged up.",
        "The kettle boiled in the small kitchen.",
        "The curtains were opened.",
        "The woman wiped it with a cloth.",
        "The woman painted the frame.",
    ),
    (
        "The man apologised.",
        "He stepped on his friend's foot.",
        "He found a coin.",
        "His friend forgave him.",
        "His friend bought a car.",
    ),
    (
        "The fire went out.",
        "It ran out of wood.",
        "The campers sat around it.",
        "The campers got cold.",
        "The campers took off their jackets.",
    ),
    (
        "The library was quiet.",
        "The students were studying for exams.",
        "A band was playing outside.",
        "The girl could hear the clock ticking.",
        "The girl could not hear herself think.",
    ),
    (
        "The car would not start.",
        "The battery was dead.",
        "The car was washed.",
        "The man called a mechanic.",
        "The man drove to work.",
    ),
    (
        "The balloon popped.",
        "The boy squeezed it too hard.",
        "The boy tied a string to it.",
        "The girl jumped at the noise.",
        "The balloon floated away.",
    ),
    (
        "The farmer harvested the wheat.",
        "The crop was ripe.",
        "The tractor was red.",
        "He sold the grain at the market.",
        "He planted the seeds.",
    ),
    (
        "The woman wore a heavy coat.",
        "It was snowing outside.",
        "It was a sunny beach day.",
        "She stayed warm on her walk.",
        "She went for a swim.",
    ),
    (
        "The museum was crowded.",
        "Entry was free that day.",
        "The paintings were old.",
        "Visitors waited in a long queue.",
        "The guards went home early.",
    ),
    (
        "The boy's grades improved.",
        "He started studying every evening.",
        "He bought a new bag.",
        "His parents were proud.",
        "He was moved to a lower class.",
    ),
    (
        "The streets were empty.",
        "It was very early in the morning.",
        "The shops were having a sale.",
        "The bus arrived on time.",
        "Traffic was heavy.",
    ),
    (
        "The bridge was closed.",
        "Engineers found a crack in it.",
        "It was lit up at night.",
        "Drivers took a longer route.",
        "Drivers crossed it faster.",
    ),
    (
        "The man's hands were shaking.",
        "He was nervous before his speech.",
        "He had a cup of tea at home.",
        "He dropped his notes.",
        "He wrote a letter calmly.",
    ),
]


def copa():
    rng = random.Random(6)
    rows = []
    for premise, cause, wrong_cause, effect, wrong_effect in COPA_EVENTS:
        for question, right, wrong in (
            ("cause", cause, wrong_cause),
            ("effect", effect, wrong_effect),
        ):
            label = rng.randrange(2)  # 0 = choice1 is right, 1 = choice2 is right
            c1, c2 = (wrong, right) if label else (right, wrong)
            rows.append(
                {
                    "premise": premise,
                    "choice1": c1,
                    "choice2": c2,
                    "question": question,
                    "label": label,
                }
            )
    rng.shuffle(rows)
    global SIZES
    saved, SIZES = SIZES, (42, 32, 22)
    write("copa", split_groups([[r] for r in rows]))
    SIZES = saved


# ---------------------------------------------------------------------------------------- squad
THINGS = [
    "clock tower",
    "spring flower festival",
    "stone bridge",
    "cheese market",
    "harbour lights",
    "glass museum",
]
METHODS = ["Varga titration", "double-flame test", "cold-ring method", "drip-count assay"]
QUANTITIES = [
    "the acidity of soil",
    "the sugar content of fruit",
    "the salt in sea water",
    "the iron in drinking water",
]
PRODUCTS_CO = [
    "bicycles",
    "sewing machines",
    "pocket radios",
    "kitchen scales",
    "typewriters",
    "garden tools",
]


def squad_passage(rng):
    kind = rng.randrange(3)
    if kind == 0:
        t, r, founder = rng.choice(CITIES), rng.choice(RIVERS), person(rng)
        y = rng.randrange(1100, 1500)
        y2, thing, n = y + rng.randrange(40, 200), rng.choice(THINGS), rng.randrange(5, 90) * 1000
        context = (
            f"{t} is a market town on the {r} River. It was founded in {y} by {founder}, "
            f"a wool merchant, and received a royal charter in {y2}. Today the town is "
            f"known for its {thing}, which attracts about {n:,} visitors each year."
        )
        qa = [
            (f"Which river is {t} on?", [f"the {r} River", f"{r} River", r]),
            (f"Who founded {t}?", [founder, f"{founder}, a wool merchant"]),
            (f"When did {t} receive a royal charter?", [str(y2)]),
            (f"What is {t} known for?", [f"its {thing}", thing]),
            (f"How many visitors does {t} attract each year?", [f"about {n:,}", f"{n:,}"]),
        ]
    elif kind == 1:
        s, city = f"{rng.choice(WOMEN)} {rng.choice(LAST)}", rng.choice(CITIES)
        y = rng.randrange(1850, 1930)
        method, qty = rng.choice(METHODS), rng.choice(QUANTITIES)
        context = (
            f"{s} ({y}-{y + rng.randrange(60, 90)}) was a chemist who spent most of her "
            f"career at the University of {city}. She is remembered for developing the "
            f"{method}, a way of measuring {qty}. In {y + 41} she became the first woman "
            f"elected to the {rng.choice(CITIES)} Academy of Sciences."
        )
        qa = [
            (
                f"Where did {s} spend most of her career?",
                [f"the University of {city}", f"University of {city}"],
            ),
            (f"What is {s} remembered for?", [f"developing the {method}", f"the {method}"]),
            (f"In what year was {s} elected to the academy?", [str(y + 41)]),
            (f"What does the {method} measure?", [qty]),
            (f"What was {s}'s profession?", ["chemist", "a chemist"]),
        ]
    else:
        last = rng.choice(LAST)
        co, a, b = f"{last} & Sons", *rng.sample(FIRST, 2)
        y, prod, city = rng.randrange(1880, 1970), rng.choice(PRODUCTS_CO), rng.choice(CITIES)
        n, model = rng.randrange(2, 60) * 100, rng.choice(["Swift", "Comet", "Heron", "Atlas"])
        context = (
            f"{co} is a maker of {prod} founded in {y} by {a} and {b} {last}. "
            f"The company is headquartered in {city} and employs around {n:,} people. "
            f"Its best-known product, the {model}, was first sold in {y + 12}."
        )
        qa = [
            (f"What does {co} make?", [prod]),
            (f"Who founded {co}?", [f"{a} and {b} {last}"]),
            (f"Where is {co} headquartered?", [city]),
            (f"When was the {model} first sold?", [str(y + 12)]),
            (f"How many people does {co} employ?", [f"around {n:,}", f"{n:,}"]),
        ]
    return [{"context": context, "question": q, "answers": ans} for q, ans in rng.sample(qa, 3)]


def squad():
    groups = unique_groups(squad_passage, random.Random(7), lambda g: g[0]["context"], 40)
    write("squad", split_groups(groups))


# --------------------------------------------------------------------------------------- record
AGENCIES = [
    "National Roads Fund",
    "Regional Transport Office",
    "Harbour Trust",
    "Civic Works Council",
]
INSTITUTES = [
    "Corvale Natural History Museum",
    "Institute of Tropical Ecology",
    "University of Saltmere",
    "Brightwater Zoological Society",
]
FROGS = ["Pellham pygmy frog", "ember tree frog", "mossback frog", "whistling reed frog"]


def record_passage(rng):
    kind = rng.randrange(3)
    if kind == 0:
        p, city, agency = person(rng), rng.choice(CITIES), rng.choice(AGENCIES)
        bridge, y = rng.choice(RIVERS), rng.randrange(2026, 2032)
        passage = (
            f"({city}) -- {p}, the mayor of {city}, said on {rng.choice(DAYS)} that the "
            f"old {bridge} Bridge will be replaced by {y}. The project, paid for by the "
            f"{agency}, is expected to cost {rng.randrange(20, 90)} million dollars. "
            "Residents have complained about traffic on the bridge for years.\n"
            f"@highlight\nThe {bridge} Bridge will be replaced by {y}\n"
            f"@highlight\nThe {agency} will pay for the work"
        )
        qa = [
            ("@placeholder said work on the new bridge would begin next spring.", p),
            ("Money from the @placeholder will cover the cost of the project.", agency),
            ("Drivers in @placeholder have waited years for a new crossing.", city),
        ]
    elif kind == 1:
        player, coach = person(rng), person(rng)
        t1, t2, t3 = rng.sample(TEAMS, 3)
        passage = (
            f"{player} scored twice as {t1} beat {t2} 3-1 on Sunday. The win moves "
            f"{t1} to the top of the league, two points ahead of {t3}. Coach {coach} "
            "praised the young forward after the match.\n"
            f"@highlight\n{player} scored two goals\n"
            f"@highlight\n{t1} are now top of the league"
        )
        qa = [
            ("@placeholder are two points behind the new leaders.", t3),
            ("@placeholder said the forward had worked hard all season.", coach),
            ("The defeat was the third in a row for @placeholder.", t2),
            ("@placeholder has now scored nine goals this season.", player),
        ]
    else:
        inst, region, frog, p = (
            rng.choice(INSTITUTES),
            rng.choice(CITIES),
            rng.choice(FROGS),
            person(rng),
        )
        passage = (
            f"Researchers at the {inst} say they have found a new species of frog in "
            f"the forests near {region}. The frog, named the {frog}, is smaller than a "
            f"fingernail. Lead author {p} said the find shows how much remains unknown.\n"
            f"@highlight\nThe frog was found near {region}\n"
            "@highlight\nIt is smaller than a fingernail"
        )
        qa = [
            ("@placeholder said more surveys of the forest are planned.", p),
            ("The team from the @placeholder spent three months in the field.", inst),
            ("Scientists believe other small animals live undiscovered near @placeholder.", region),
        ]
    picked = rng.sample(qa, rng.choice([1, 2]))
    return [{"passage": passage, "query": q, "answers": [a]} for q, a in picked]


def record():
    groups = unique_groups(record_passage, random.Random(8), lambda g: g[0]["passage"], 80)
    write("record", split_groups(groups))


# ------------------------------------------------------------------------------------------ e2e
E2E_NAMES = [
    "The Copper Kettle",
    "Blue Heron",
    "Saffron House",
    "The Old Mill",
    "Luna Verde",
    "The Wandering Goose",
    "Cotton Street Kitchen",
    "The Lantern",
    "Fig and Olive",
    "The Green Man",
    "Riverside Grill",
    "The Silver Spoon",
    "Maple Corner",
    "The Crooked Fork",
    "Little Tokyo Bar",
    "The Harbour Inn",
]
E2E_NEAR = [
    "the Grand Hotel",
    "the railway station",
    "the Crown Theatre",
    "Maple Park",
    "the Town Museum",
    "the Old Bridge",
]
FOODS = ["Italian", "French", "Chinese", "Indian", "English", "Japanese", "Fast food"]
# price range -> (noun phrase after "It has", predicate after "It is")
PRICES = {
    "cheap": ("cheap food", "cheap"),
    "moderate": ("moderately priced food", "moderately priced"),
    "high": ("expensive food", "expensive"),
    "less than £20": ("meals for less than £20", "priced under £20"),
    "£20-25": ("meals for £20-25", "priced around £20-25"),
    "more than £30": ("meals costing more than £30", "priced above £30"),
}
RATINGS = {
    "low": "a low customer rating",
    "average": "an average customer rating",
    "high": "a high customer rating",
    "1 out of 5": "a customer rating of 1 out of 5",
    "3 out of 5": "a customer rating of 3 out of 5",
    "5 out of 5": "a customer rating of 5 out of 5",
}


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def serving(food):
    return "fast food" if food == "Fast food" else f"{food} food"


def e2e_group(rng):
    mr = {
        "name": rng.choice(E2E_NAMES),
        "eatType": rng.choice(["restaurant", "coffee shop", "pub"]),
    }
    optional = ["food", "priceRange", "customer rating", "area", "familyFriendly", "near"]
    for key in rng.sample(optional, rng.randrange(2, 5)):
        mr[key] = {
            "food": lambda: rng.choice(FOODS),
            "priceRange": lambda: rng.choice(list(PRICES)),
            "customer rating": lambda: rng.choice(list(RATINGS)),
            "area": lambda: rng.choice(["city centre", "riverside"]),
            "familyFriendly": lambda: rng.choice(["yes", "no"]),
            "near": lambda: rng.choice(E2E_NEAR),
        }[key]()
    order = [
        "name",
        "eatType",
        "food",
        "priceRange",
        "customer rating",
        "area",
        "familyFriendly",
        "near",
    ]
    mr_text = ", ".join(f"{k}[{mr[k]}]" for k in order if k in mr)
    refs = []
    for style in rng.sample(range(3), rng.choice([2, 3])):
        ref = e2e_realise(mr, style, rng)
        if ref not in refs:  # two styles can coincide when the MR has no area or near
            refs.append(ref)
    return [{"meaning_representation": mr_text, "human_reference": r} for r in refs]


def e2e_realise(mr, style, rng):
    name, eat = mr["name"], mr["eatType"]
    food = mr.get("food")
    where = []
    if "area" in mr:
        where.append(
            "in the city centre"
            if mr["area"] == "city centre"
            else rng.choice(["by the riverside", "in the riverside area"])
        )
    if "near" in mr:
        where.append(f"{rng.choice(['near', 'close to'])} {mr['near']}")
    if style == 0 and food:
        head = (
            f"{name} is a fast food {eat}"
            if food == "Fast food"
            else f"{name} is {article(food)} {food} {eat}"
        )
    elif food:
        head = f"{name} is {article(eat)} {eat} serving {serving(food)}"
    else:
        head = f"{name} is {article(eat)} {eat}"
    if style == 2 and where:
        first = f"{where[0][0].upper()}{where[0][1:]}, you will find {name}, {article(eat)} {eat}"
        if food:
            first += f" serving {serving(food)}"
        first += (" " + " ".join(where[1:])) if len(where) > 1 else ""
        sentences = [first + "."]
    else:
        sentences = [" ".join([head, *where]) + "."]
    price, rating = mr.get("priceRange"), mr.get("customer rating")
    if style == 1 and price:
        sentence = f"It is {PRICES[price][1]}"
        sentences.append(sentence + (f" and has {RATINGS[rating]}." if rating else "."))
    elif price or rating:
        parts = ([PRICES[price][0]] if price else []) + ([RATINGS[rating]] if rating else [])
        sentences.append(f"It has {' and '.join(parts)}.")
    if "familyFriendly" in mr:
        yes = mr["familyFriendly"] == "yes"
        options = (
            ["It is family friendly.", "Children are welcome."]
            if yes
            else ["It is not family friendly.", "It is not suitable for children."]
        )
        sentences.append(options[style % 2])
    return " ".join(sentences)


def e2e():
    groups = unique_groups(
        e2e_group, random.Random(9), lambda g: g[0]["meaning_representation"], 60
    )
    write("e2e", split_groups(groups))


# --------------------------------------------------------------------------------------- alpaca
PLURALS = [
    ("child", "children"),
    ("mouse", "mice"),
    ("tooth", "teeth"),
    ("box", "boxes"),
    ("city", "cities"),
    ("knife", "knives"),
    ("sheep", "sheep"),
    ("cactus", "cacti"),
    ("woman", "women"),
    ("potato", "potatoes"),
    ("leaf", "leaves"),
    ("goose", "geese"),
]
PRODUCE = [
    ("apple", "Fruit"),
    ("carrot", "Vegetable"),
    ("mango", "Fruit"),
    ("spinach", "Vegetable"),
    ("pear", "Fruit"),
    ("broccoli", "Vegetable"),
    ("cherry", "Fruit"),
    ("onion", "Vegetable"),
    ("plum", "Fruit"),
    ("leek", "Vegetable"),
]
ANTONYMS = [
    ("happy", "sad"),
    ("ancient", "modern"),
    ("generous", "selfish"),
    ("arrive", "depart"),
    ("expand", "shrink"),
    ("brave", "cowardly"),
    ("visible", "invisible"),
    ("rough", "smooth"),
    ("early", "late"),
    ("accept", "refuse"),
]
PAST = [
    ("She walks to school every day.", "She walked to school every day."),
    ("They build a treehouse in the garden.", "They built a treehouse in the garden."),
    ("He writes a letter to his aunt.", "He wrote a letter to his aunt."),
    ("We eat dinner at seven.", "We ate dinner at seven."),
    ("The dog chases the ball.", "The dog chased the ball."),
    ("I think about the question.", "I thought about the question."),
    ("The children sing in the choir.", "The children sang in the choir."),
    ("My brother drives a blue van.", "My brother drove a blue van."),
]
CAPITALS = [
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Egypt", "Cairo"),
    ("Australia", "Canberra"),
    ("Portugal", "Lisbon"),
]
TITLES = [
    "the old man and the lake",
    "a walk through the winter garden",
    "notes from a small harbour",
    "the last train to the coast",
    "how to bake bread at home",
    "songs of the northern hills",
]
NO_INPUT = [
    ("Name the three primary colors.", "The three primary colors are red, blue and yellow."),
    ("Suggest a name for a pet goldfish.", "Bubbles would be a fun name for a pet goldfish."),
    (
        "Explain what photosynthesis is in one sentence.",
        "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to "
        "make sugar and release oxygen.",
    ),
    (
        "List three ways to save water at home.",
        "1. Turn off the tap while brushing your teeth.\n2. Take shorter showers.\n3. Fix leaking "
        "pipes quickly.",
    ),
    (
        "Write a haiku about autumn.",
        "Red leaves drift and fall\ncool wind hums along the lane\nthe year breathes slowly",
    ),
    (
        "What is the boiling point of water at sea level?",
        "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
    ),
    (
        "Give two tips for getting a good night's sleep.",
        "Go to bed at the same time every night, and avoid screens for an hour before sleeping.",
    ),
    ("Describe the taste of a lemon.", "A lemon tastes very sour, with a sharp and fresh flavor."),
    (
        "Name four planets in our solar system.",
        "Four planets in our solar system are Mercury, Venus, Mars and Jupiter.",
    ),
    (
        "Write a short greeting for a birthday card.",
        "Happy birthday! Wishing you a year full of laughter, good friends and new adventures.",
    ),
    (
        "Explain why the sky looks blue.",
        "Sunlight is scattered by the air, and blue light is scattered much more than red light, "
        "so the sky looks blue.",
    ),
    ("Give an example of a renewable energy source.", "Wind power is a renewable energy source."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    (
        "Suggest a healthy breakfast.",
        "A bowl of oatmeal with sliced banana and a handful of nuts is a healthy breakfast.",
    ),
    (
        "List three animals that live in the ocean.",
        "Three animals that live in the ocean are dolphins, octopuses and sea turtles.",
    ),
    (
        "Write one sentence that uses the word 'curious'.",
        "The curious kitten climbed into the box to see what was inside.",
    ),
    (
        "Explain what a noun is.",
        "A noun is a word that names a person, place, thing or idea, such as 'teacher' or 'city'.",
    ),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("Give a synonym for the word 'quick'.", "A synonym for 'quick' is 'fast'."),
    ("Name a musical instrument with strings.", "The violin is a musical instrument with strings."),
    (
        "Describe a rainy day in two sentences.",
        "Grey clouds covered the town and rain tapped on every window. People hurried along the "
        "street under bright umbrellas.",
    ),
    ("What is the opposite of 'north'?", "The opposite of north is south."),
    ("Suggest a title for a story about a lost dog.", "Finding the Way Home"),
    (
        "Give three tips for learning a new language.",
        "1. Practice a little every day.\n2. Listen to native speakers.\n3. Do not be afraid to "
        "make mistakes.",
    ),
    (
        "Explain what a budget is.",
        "A budget is a plan that shows how much money you expect to earn and how you will spend it.",
    ),
    ("Name two things you need to make a cup of tea.", "You need hot water and a tea bag."),
    (
        "Why do people wear seat belts?",
        "People wear seat belts to protect themselves from serious injury in a crash.",
    ),
    (
        "Write a polite way to decline an invitation.",
        "Thank you so much for inviting me, but I am afraid I cannot make it this time.",
    ),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Give an example of a mammal that can fly.", "The bat is a mammal that can fly."),
    (
        "Describe what a library is.",
        "A library is a place where people can borrow books and find information for free.",
    ),
    (
        "List the four seasons of the year.",
        "The four seasons are spring, summer, autumn and winter.",
    ),
    (
        "Suggest a way to reduce plastic waste.",
        "Carry a reusable shopping bag instead of taking plastic bags at the shop.",
    ),
    (
        "Explain what recycling means.",
        "Recycling means turning used materials, such as paper or glass, into new products.",
    ),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    (
        "Write a one-sentence summary of why exercise is good for you.",
        "Exercise strengthens your heart and muscles, improves your mood and helps you sleep better.",
    ),
]


def alpaca_with_input(rng):
    kind = rng.randrange(10)
    if kind == 0:
        nums = rng.sample(range(1, 60), rng.randrange(4, 7))
        return (
            "Sort the following numbers in ascending order.",
            ", ".join(map(str, nums)),
            ", ".join(map(str, sorted(nums))),
        )
    if kind == 1:
        k = rng.randrange(-4, 9)
        c, f = 5 * k, 9 * k + 32
        return (
            "Convert the temperature from Celsius to Fahrenheit.",
            f"{c} degrees Celsius",
            f"{c} degrees Celsius is {f} degrees Fahrenheit.",
        )
    if kind == 2:
        w, p = rng.choice(PLURALS)
        return ("Give the plural form of the following noun.", w, p)
    if kind == 3:
        w, c = rng.choice(PRODUCE)
        return ("Classify the following item as a fruit or a vegetable.", w, c)
    if kind == 4:
        w, a = rng.choice(ANTONYMS)
        return ("Write an antonym of the given word.", w, a)
    if kind == 5:
        a, b = rng.randrange(10, 90), rng.randrange(10, 90)
        return ("Add the two numbers.", f"{a} and {b}", f"The sum of {a} and {b} is {a + b}.")
    if kind == 6:
        s, p = rng.choice(PAST)
        return ("Rewrite the sentence in the past tense.", s, p)
    if kind == 7:
        t = rng.choice(TITLES)
        return ("Capitalize the first letter of every word in the title.", t, t.title())
    if kind == 8:
        country, capital = rng.choice(CAPITALS)
        return (
            "What is the capital city of the given country?",
            country,
            f"The capital of {country} is {capital}.",
        )
    nums = rng.sample(range(1, 200), rng.randrange(4, 7))
    return (
        "Find the largest number in the list.",
        ", ".join(map(str, nums)),
        f"The largest number is {max(nums)}.",
    )


def alpaca():
    rng = random.Random(10)
    seen, with_input = set(), []
    while len(with_input) < 70:
        instruction, inp, out = alpaca_with_input(rng)
        if (instruction, inp) not in seen:
            seen.add((instruction, inp))
            with_input.append({"instruction": instruction, "input": inp, "output": out})
    without = [{"instruction": i, "input": "", "output": o} for i, o in NO_INPUT]
    rows = with_input + without
    rng.shuffle(rows)
    write("alpaca", split_groups([[r] for r in rows]))


if __name__ == "__main__":
    for make in (sst2, rte, qnli, boolq, copa, squad, record, e2e, alpaca):
        make()
