"""Entity-type schemas and one-sentence natural-language descriptions for the registered data sets.

The descriptions go into prompts (zero-shot CrossNER especially), so they are concrete: what counts, a few
examples, and, where CrossNER splits a generic type by domain (``person`` vs ``researcher``/``writer``/...),
which of the two a mention belongs to. CoNLL-2003 descriptions come from the MRC-NER ``queries.json`` that ships
with the data (see ``ner.data.conll_descriptions``); ``CONLL_FALLBACK`` is only used when that file is absent.
"""
from __future__ import annotations

CONLL_TYPES = ["location", "misc", "organisation", "person"]

CROSSNER_TYPES: dict[str, list[str]] = {
    "ai": ["algorithm", "conference", "country", "field", "location", "metrics", "misc", "organisation",
           "person", "product", "programlang", "researcher", "task", "university"],
    "literature": ["award", "book", "country", "event", "literarygenre", "location", "magazine", "misc",
                   "organisation", "person", "poem", "writer"],
    "music": ["album", "award", "band", "country", "event", "location", "misc", "musicalartist",
              "musicalinstrument", "musicgenre", "organisation", "person", "song"],
    "politics": ["country", "election", "event", "location", "misc", "organisation", "person",
                 "politicalparty", "politician"],
    "science": ["academicjournal", "astronomicalobject", "award", "chemicalcompound", "chemicalelement",
                "country", "discipline", "enzyme", "event", "location", "misc", "organisation", "person",
                "protein", "scientist", "theory", "university"],
}

CONLL_FALLBACK: dict[str, str] = {
    "person": "Names of people or families, e.g. Nelson Mandela, the Kennedys.",
    "location": "Names of politically or geographically defined places: countries, cities, regions, rivers, "
                "mountains, e.g. Germany, Tokyo, the Nile.",
    "organisation": "Names of companies, government bodies, sports teams, parties and other organisations, "
                    "e.g. Reuters, the European Commission, Manchester United.",
    "misc": "Other named entities: nationalities, events, products, works of art, languages, "
            "e.g. German, the World Cup, Windows.",
}

# Domain-independent descriptions of every CrossNER type.
TYPE_DESCRIPTIONS: dict[str, str] = {
    "academicjournal": "A named scientific or academic journal, e.g. Nature, Physical Review Letters, The Lancet.",
    "album": "The title of a music album or EP, e.g. Abbey Road, Thriller, OK Computer.",
    "algorithm": "A named algorithm, model or method from AI and computing, e.g. support vector machine, "
                 "backpropagation, long short-term memory, k-means.",
    "astronomicalobject": "A named astronomical object such as a planet, moon, star, galaxy, comet or asteroid, "
                          "e.g. Mars, Titan, Andromeda Galaxy, Halley's Comet.",
    "award": "A named prize, honour or medal, e.g. Nobel Prize in Physics, Grammy Award, Booker Prize.",
    "band": "A named band or musical group (not a single artist), e.g. The Beatles, Metallica, ABBA.",
    "book": "The title of a book, novel, play or other long written work, e.g. Pride and Prejudice, Ulysses, "
            "Hamlet.",
    "chemicalcompound": "A chemical compound, molecule or substance made of several elements, e.g. water, "
                        "carbon dioxide, ethanol, sodium chloride.",
    "chemicalelement": "A chemical element of the periodic table, e.g. oxygen, iron, helium, uranium.",
    "conference": "A named academic conference, workshop or their proceedings, e.g. NeurIPS, AAAI, ICML, CVPR.",
    "country": "A sovereign country or nation-state, e.g. France, Japan, United States, Soviet Union "
               "(cities and regions are location).",
    "discipline": "A scientific discipline or field of study, e.g. physics, molecular biology, astronomy, "
                  "geology.",
    "election": "A named election, primary or referendum, e.g. 2016 United States presidential election, "
                "1997 general election.",
    "enzyme": "A named enzyme, i.e. a protein that catalyses a reaction, e.g. DNA polymerase, lactase, "
              "RuBisCO.",
    "event": "A named event such as a war, festival, ceremony, tournament or historic incident, e.g. World "
             "War II, Woodstock, the French Revolution.",
    "field": "A research field or area of study in AI and computing, e.g. machine learning, computer vision, "
             "natural language processing.",
    "literarygenre": "A genre or form of literature, e.g. novel, poetry, science fiction, short story, satire.",
    "location": "A named place that is not a country: a city, region, state, continent, river, mountain or "
                "building, e.g. Paris, California, Europe, the Alps.",
    "magazine": "A named magazine, periodical or newspaper, e.g. The New Yorker, Time, The Paris Review.",
    "metrics": "A named evaluation measure or score, e.g. accuracy, precision, F1 score, error rate, BLEU.",
    "misc": "A named entity that fits none of the other types, e.g. a nationality, language, film or "
            "named document.",
    "musicalartist": "A person who makes music: singer, rapper, instrumentalist, composer or conductor, "
                     "e.g. Bob Dylan, Beyonce, Wolfgang Amadeus Mozart.",
    "musicalinstrument": "A musical instrument, e.g. guitar, piano, violin, saxophone, drums.",
    "musicgenre": "A genre or style of music, e.g. rock, jazz, hip hop, heavy metal, classical music.",
    "organisation": "A named organisation such as a company, institution, agency, team or association, "
                    "e.g. Google, NASA, United Nations.",
    "person": "The name of a person, e.g. Marie Antoinette, John Smith.",
    "poem": "The title of a poem, e.g. The Raven, The Waste Land, Ozymandias.",
    "politicalparty": "A named political party, e.g. Labour Party, Democratic Party, Christian Democratic Union.",
    "politician": "A person known as a politician: a head of state, minister, legislator or candidate for "
                  "office, e.g. Angela Merkel, Abraham Lincoln.",
    "product": "A named product, system, software or device, e.g. Siri, TensorFlow, AlphaGo, iPhone.",
    "programlang": "A named programming language, e.g. Python, Java, MATLAB, Lisp, C++.",
    "protein": "A named protein or protein family that is not an enzyme, e.g. hemoglobin, insulin, p53, "
               "collagen.",
    "researcher": "A person known as a researcher or scientist in AI and computing, e.g. Geoffrey Hinton, "
                  "Yann LeCun, Alan Turing.",
    "scientist": "A person known as a scientist, e.g. Marie Curie, Albert Einstein, Charles Darwin.",
    "song": "The title of a song or single, e.g. Bohemian Rhapsody, Imagine, Like a Rolling Stone.",
    "task": "A problem or application that AI systems solve, e.g. speech recognition, machine translation, "
            "image classification, question answering.",
    "theory": "A named scientific theory, law or principle, e.g. general relativity, theory of evolution, "
              "Big Bang theory.",
    "university": "A named university, college or academic institute, e.g. Stanford University, MIT, "
                  "University of Cambridge.",
    "writer": "A person known as a writer: novelist, poet, playwright or essayist, e.g. Charles Dickens, "
              "Emily Dickinson, Leo Tolstoy.",
}

# CrossNER carves a domain-specific role out of person/organisation/misc; say which side a mention belongs to.
DOMAIN_DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("ai", "person"): "The name of a person who is not described as a researcher, e.g. a businessperson, "
                      "writer or politician mentioned in an AI text.",
    ("ai", "organisation"): "A named company, institution or agency that is not a university, e.g. Google, "
                            "DARPA, OpenAI.",
    ("ai", "misc"): "A named AI-related entity that fits none of the other types, e.g. a nationality, a "
                    "data set, a competition or a named concept.",
    ("literature", "person"): "The name of a person who is not a writer, e.g. a king, a critic, a publisher or "
                              "a fictional character.",
    ("literature", "misc"): "A named entity that fits none of the other literature types, e.g. a nationality, "
                            "a language, a film or a literary movement.",
    ("literature", "event"): "A named event such as a war, literary festival or historic incident, "
                             "e.g. World War I, Hay Festival.",
    ("music", "person"): "The name of a person who is not a musical artist, e.g. a producer, manager, actor "
                         "or poet.",
    ("music", "organisation"): "A named organisation that is not a band: a record label, orchestra, "
                               "broadcaster or company, e.g. Columbia Records, BBC.",
    ("music", "event"): "A named music event such as a festival, concert tour or contest, e.g. "
                        "Woodstock, Eurovision Song Contest.",
    ("music", "misc"): "A named entity that fits none of the other music types, e.g. a nationality, a film, "
                       "a TV show or a record chart.",
    ("politics", "person"): "The name of a person who is not a politician, e.g. a journalist, activist, "
                            "judge or royal.",
    ("politics", "organisation"): "A named organisation that is not a political party: a government body, "
                                  "parliament, union or international body, e.g. European Union.",
    ("politics", "event"): "A named political event that is not an election, e.g. a war, summit, protest or "
                           "revolution.",
    ("politics", "misc"): "A named entity that fits none of the other politics types, e.g. a nationality, a "
                          "law or treaty, or a political movement.",
    ("science", "person"): "The name of a person who is not a scientist, e.g. a ruler, patron or writer "
                           "mentioned in a science text.",
    ("science", "organisation"): "A named organisation that is not a university: a space agency, society "
                                 "or laboratory, e.g. NASA, Royal Society.",
    ("science", "misc"): "A named science entity that fits none of the other types, e.g. a spacecraft or "
                         "mission, an instrument, a nationality or a named technique.",
}


def generic_description(entity_type: str) -> str:
    """Fallback for a type nobody described (a data file brought by the user)."""
    words = entity_type.replace("_", " ").replace("-", " ").strip()
    return f"A named entity of the type '{words}'."


def describe(entity_type: str, domain: str | None = None) -> str:
    """The most specific description available: domain override, then generic CrossNER text, then fallback."""
    if domain is not None and (domain, entity_type) in DOMAIN_DESCRIPTIONS:
        return DOMAIN_DESCRIPTIONS[(domain, entity_type)]
    return TYPE_DESCRIPTIONS.get(entity_type) or generic_description(entity_type)
