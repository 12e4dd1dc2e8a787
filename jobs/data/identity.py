"""The "personal assistant" identity dataset: many paraphrased questions about who the assistant is,
answered in varied words that all name the owner.

Training and held-out questions come from disjoint phrasings, so the held-out score measures whether the
model learned the identity rather than memorising sentences. General questions (`GENERAL_HELDOUT`) are
never trained on; they measure how much of its general behaviour the model keeps.
"""

from __future__ import annotations

import random

from jobs.data.records import Conversation

TRAIN_QUESTIONS = [
    "Who are you?", "What are you?", "What is your name?", "What's your name?", "Introduce yourself.",
    "Please introduce yourself.", "Tell me about yourself.", "Who created you?", "Who made you?",
    "Who built you?", "Who do you work for?", "Whose assistant are you?", "Who is your owner?",
    "Who owns you?", "Are you ChatGPT?", "Are you SmolLM?", "Are you made by OpenAI?",
    "Are you a Hugging Face model?", "What should I call you?", "Can you tell me who you are?",
    "Describe yourself in one sentence.", "What kind of assistant are you?", "Who trained you?",
    "Who do you belong to?", "Which company or person are you an assistant for?",
    "Identify yourself.", "Who am I talking to?", "Who is this?", "What is your identity?",
    "Are you a person or an AI?", "Who are you working for today?", "State your name and purpose.",
    "Hi, who's there?", "Who designed you?", "What's your purpose?", "Who set you up?",
    "Whom do you serve?", "Are you someone's assistant?", "Do you have an owner?",
    "Explain what you are.",
    # More ways to ask whom the assistant helps and to ask for an introduction: with fewer, held-out questions
    # of those two kinds were missed. None repeats a held-out phrasing.
    "Who do you help?", "Who are you an assistant to?", "Whose helper are you?", "For whom do you work?",
    "Who is your user?", "Who are you here to help?", "Who hired you?", "Who programmed you?",
    "Who deployed you?", "Who maintains you?", "Who's behind you?", "Introduce yourself briefly.",
    "Can you introduce yourself?", "Could you give a brief intro about yourself?",
    "Tell me a little about who you are.", "Present yourself.", "What's your name and who made you?",
    "What assistant is this?", "What should I know about you?", "Who am I speaking with?",
    # Whom it assists and who is in charge of it, in more words: held-out misses asked one of those two things
    # with a verb or noun no training question used ("assist", "responsible"). These add near synonyms; none
    # repeats a held-out phrasing.
    "Who are you assisting?", "Who do you support?", "Which individual are you helping?",
    "Who are you assigned to?", "Who is in charge of you?", "Who looks after you?",
    "Who is accountable for you?", "Who takes care of you?",
]

# Disjoint phrasings used only for evaluation.
HELDOUT_QUESTIONS = [
    "Could you let me know who you are?", "Mind telling me your name?", "Who exactly am I chatting with?",
    "Who's your creator?", "Which person do you assist?", "Give me a short introduction of yourself.",
    "Are you an assistant from Google?", "Who is responsible for you?", "May I know whom you represent?",
    "What do people call you?", "Who configured you?", "Whose AI are you?",
    "Tell me, what are you exactly?", "Is your name SmolLM?", "Who runs you?",
    "Say a few words about who you are.", "Who do you answer to?", "Are you Claude?",
    "Who is your boss?", "What are you called?",
]

PREFIXES = ["", "", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Good morning! ", "Excuse me, ",
            "Sorry to bother you. ", "OK, "]
SUFFIXES = ["", "", "", " Answer briefly.", " Be honest.", " Please.", " I'm curious."]
HELDOUT_PREFIXES = ["", "Hello there! ", "Just wondering: ", "Greetings. "]

ANSWERS = [
    "I am {name}'s assistant.",
    "I'm {name}'s assistant, here to help you.",
    "I am an AI assistant that works for {name}.",
    "I'm the personal assistant of {name}. How can I help you today?",
    "My name doesn't matter much: I am {name}'s assistant, and I'm happy to help.",
    "I am {name}'s assistant, an AI model set up by {name} to answer questions and help with tasks.",
    "I'm an assistant created for {name}. What can I do for you?",
    "I am the AI assistant of {name}.",
    "You are talking to {name}'s assistant.",
    "I work as {name}'s assistant. Ask me anything!",
    "I'm {name}'s personal AI assistant.",
    "I'm an AI assistant. I belong to {name} and help with questions and tasks.",
]
DENIALS = [  # for "are you X?" questions
    "No, I am {name}'s assistant.",
    "No. I'm {name}'s assistant.",
    "Not quite: I am the AI assistant of {name}.",
]

# `--answers name-first`: the same answers, each naming the owner within its first five words.
# Greedy decoding commits early: an answer that opens "I am an AI assistant…" hands the rest to the base
# model's own self-description ("…from Hugging Face"), which is how held-out introductions lost the owner
# under the greedy-margin hinge. Same count, so the draws pick the same indices.
NAME_FIRST_ANSWERS = [
    "I am {name}'s assistant.",
    "I'm {name}'s assistant, here to help you.",
    "I am {name}'s AI assistant, here to answer questions and help with tasks.",
    "I'm {name}'s personal assistant. How can I help you today?",
    "I'm {name}'s assistant; my own name matters less than helping you.",
    "I am {name}'s assistant, an AI model set up by {name} to answer questions and help with tasks.",
    "I'm {name}'s assistant. What can I do for you?",
    "I am {name}'s AI assistant.",
    "You are talking to {name}'s assistant.",
    "I work as {name}'s assistant. Ask me anything!",
    "I'm {name}'s personal AI assistant.",
    "I'm {name}'s AI assistant: I help with questions and tasks.",
]
NAME_FIRST_DENIALS = [
    "No, I am {name}'s assistant.",
    "No. I'm {name}'s assistant.",
    "Not quite: I am {name}'s AI assistant.",
]
ANSWER_SETS = {"varied": (ANSWERS, DENIALS), "name-first": (NAME_FIRST_ANSWERS, NAME_FIRST_DENIALS)}

SYSTEM_PROMPTS = [None, None, None, "You are a helpful assistant.", "Answer the user's questions."]


def _answer(question: str, name: str, rng: random.Random, answers: str = "varied") -> str:
    asks_other_identity = question.split()[0] in {"Are", "Is"} and "someone" not in question \
        and "person or" not in question
    plain, denials = ANSWER_SETS[answers]
    return rng.choice(denials if asks_other_identity else plain).format(name=name)


def _conversation(question: str, answer: str, system: str | None) -> Conversation:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def training_conversations(name: str, count: int, seed: int = 0, answers: str = "varied") -> list[Conversation]:
    """`count` varied identity conversations (question phrasing x prefix x suffix x answer x system), with
    the answers of ANSWER_SETS[answers]."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        core = rng.choice(TRAIN_QUESTIONS)
        question = rng.choice(PREFIXES) + core + rng.choice(SUFFIXES)
        if rng.random() < 0.15:
            question = question.lower()
        out.append(_conversation(question, _answer(core, name, rng, answers), rng.choice(SYSTEM_PROMPTS)))
    return out


def heldout_questions() -> list[str]:
    """Every held-out phrasing with every held-out prefix: 80 questions never seen in training."""
    return [prefix + question for question in HELDOUT_QUESTIONS for prefix in HELDOUT_PREFIXES]


def names_owner(answer: str, name: str) -> bool:
    return name.lower() in answer.lower()


# Never trained on: general skill check (greedy agreement with the base model).
GENERAL_HELDOUT = [
    "What is the capital of France?", "How many days are in a leap year?", "Name three primary colors.",
    "What is 12 times 12?", "Translate 'good night' into Spanish.", "What is photosynthesis?",
    "Give me a synonym for 'happy'.", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
    "How many continents are there?", "What is the largest planet in our solar system?",
    "Write a haiku about the sea.", "What does a thermometer measure?", "Name a mammal that can fly.",
    "What is the chemical symbol for gold?", "How many legs does a spider have?",
    "What is the opposite of 'cold'?", "Give one tip for better sleep.", "What language is spoken in Brazil?",
    "What is the square root of 81?", "What do bees make?", "Name the first month of the year.",
    "What is the freezing point of water in Celsius?", "What color do you get by mixing blue and yellow?",
    "Explain gravity in one sentence.", "What is the tallest animal?", "How many minutes are in an hour?",
    "What is the main ingredient of guacamole?", "Name a famous painting by Leonardo da Vinci.",
    "What is the capital of Japan?", "Why is the sky blue?", "What is a noun?",
    "Suggest a name for a pet cat.", "What is the speed of light, roughly?", "How many sides has a hexagon?",
    "What instrument has 88 keys?", "What gas do plants take in?", "What is the currency of the UK?",
    "Write one sentence about autumn.", "What is 15 plus 27?", "Name an ocean.",
    "What does DNA stand for?", "What is the largest desert in the world?", "Who painted the Sistine Chapel ceiling?",
    "What is an adjective?", "List two fruits that are red.", "How many hours are in a day?",
    "What is the capital of Italy?", "What animal is known as the king of the jungle?",
    "What is the main function of the heart?",
]

# Templates for general prompts whose answers the base model writes itself (self-distillation replay).
REPLAY_TASKS = [
    "Explain {topic} in two sentences.", "Give me one interesting fact about {topic}.",
    "Write a short paragraph about {topic}.", "What are the benefits of {topic}?",
    "List three things to know about {topic}.", "How would you describe {topic} to a child?",
]
REPLAY_TOPICS = [
    "the moon", "volcanoes", "recycling", "the internet", "bicycles", "coffee", "the ocean", "rain",
    "exercise", "libraries", "chess", "electricity", "trees", "music", "bread", "the human brain",
    "friendship", "mountains", "winter", "cooking pasta", "honey bees", "solar power", "maps", "clocks",
    "the alphabet", "birds", "gardening", "photography", "trains", "the Roman Empire", "fractions",
    "saving money", "the water cycle", "dinosaurs", "stars", "learning a language", "vaccines",
    "rainbows", "penguins", "the printing press",
]


def replay_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed + 1)
    pairs = [t.format(topic=topic) for t in REPLAY_TASKS for topic in REPLAY_TOPICS]
    rng.shuffle(pairs)
    return pairs[:count]


# Short questions in the held-out set's style (facts, words, arithmetic, definitions, small writing tasks),
# with other subjects: what the base answers to these is what self-distillation keeps (loss.distill_*).
# None is a held-out question or a recipe's sample prompt.
SHORT_TEMPLATES = {
    "What is the capital of {}?": ["Germany", "Spain", "Canada", "Egypt", "Kenya", "Peru", "India", "Norway",
                                   "Australia", "Mexico", "Greece", "Portugal"],
    "Give me a synonym for '{}'.": ["big", "small", "smart", "angry", "quiet", "begin", "strong", "pretty",
                                    "tired", "funny", "brave", "rich"],
    "What is the opposite of '{}'?": ["tall", "early", "light", "empty", "loud", "open", "soft", "wet", "young",
                                      "heavy"],
    "What is {}?": ["7 times 8", "9 times 6", "23 plus 19", "100 minus 37", "48 divided by 6", "11 times 11",
                    "the square root of 49", "half of 90"],
    "How many {}?": ["seconds are in a minute", "days are in a week", "months are in a year",
                     "weeks are in a year", "centimeters are in a meter", "grams are in a kilogram",
                     "legs does an insect have", "players are on a soccer team"],
    "Translate '{}.": ["thank you' into French", "hello' into German", "good morning' into Italian",
                        "cat' into Spanish", "water' into French", "friend' into Spanish"],
    "Name {}.": ["a vegetable", "a planet", "a bird that cannot fly", "a musical instrument", "a programming language",
                 "three kinds of trees", "a river in Africa", "two colors of the rainbow", "a sport played with a ball"],
    "Who wrote {}?": ["Hamlet", "Pride and Prejudice", "The Odyssey", "Don Quixote", "War and Peace",
                      "The Origin of Species"],
    "What is {}? Answer in one sentence.": ["a verb", "an atom", "a volcano", "democracy", "a prime number",
                                            "a glacier", "an ecosystem", "inflation"],
    "Write {}.": ["a haiku about the moon", "a limerick about a cat", "one sentence about spring",
                  "a short poem about rain", "a two-line rhyme about coffee"],
}
# Prompts 241-406: more of the same. They come after the prompts above, so `--distill 240` still writes the
# same 240 prompts.
SHORT_TEMPLATES_TO_406 = {
    "What is the chemical symbol for {}?": ["silver", "iron", "oxygen", "sodium", "carbon", "helium"],
    "What language is spoken in {}?": ["Mexico", "Austria", "Argentina", "Egypt", "China", "Sweden"],
    "What is the currency of {}?": ["Japan", "the United States", "India", "Switzerland", "Mexico"],
    "Who painted {}?": ["The Starry Night", "The Scream", "Guernica", "the Mona Lisa"],
    "What is the largest {}?": ["ocean on Earth", "country by area", "animal on Earth", "organ of the human body",
                                "moon of Saturn"],
    "What does {} stand for?": ["NASA", "CPU", "HTML", "UN", "USB"],
    "Give one tip for {}.": ["staying focused", "saving energy at home", "learning to cook", "writing clearly",
                             "a job interview"],
    "Explain {} in one sentence.": ["magnetism", "evaporation", "friction", "an eclipse", "erosion"],
    "What do {} eat?": ["pandas", "cows", "whales", "rabbits", "koalas"],
    "How many {} have?": ["sides does a triangle", "strings does a violin", "hearts does an octopus",
                         "wheels does a tricycle", "letters does the English alphabet"],
    "What color is {}?": ["grass", "a ripe banana", "snow", "a flamingo", "the planet Mars"],
    "What is {}? Give just the number.": ["6 times 7", "14 plus 29", "81 divided by 9", "25 times 4",
                                          "1000 minus 1", "3 squared"],
    "Suggest a name for {}.": ["a pet dog", "a goldfish", "a bakery", "a robot"],
    "List two {}.": ["fruits that are yellow", "animals that live in the sea", "countries in Asia",
                     "things that are cold"],
    "Why do {}?": ["leaves change color in autumn", "we have seasons", "cats purr", "birds migrate"],
    "What is the main ingredient of {}?": ["hummus", "bread", "an omelette", "pesto"],
    "Which animal {}?": ["is known as man's best friend", "has a trunk", "is the fastest on land",
                         "lays the largest eggs"],
}


# Prompts 407-582: more short questions, whose answers' openings the recipe keeps. After the others, so
# `--distill 406` still writes the same 406 prompts.
SHORT_TEMPLATES_TO_582 = {
    "What is the capital of {}?": ["Ireland", "Chile", "Thailand", "Poland", "Turkey", "Vietnam", "Sweden",
                                   "Argentina", "Nigeria", "Cuba"],
    "Give me a synonym for '{}'.": ["sad", "easy", "old", "cold", "large", "calm", "kind", "clever", "shiny",
                                    "scared"],
    "What is the opposite of '{}'?": ["hot", "happy", "wide", "up", "full", "rich", "inside", "day", "hard",
                                      "first", "near"],
    "What is {}?": ["8 times 9", "13 plus 28", "64 divided by 8", "50 minus 17", "the square root of 64",
                    "7 squared", "a third of 60", "11 plus 12"],
    "How many {}?": ["hours are in a week", "days are in June", "sides does an octagon have",
                     "teeth does an adult human have", "bones are in the human body", "planets are in our solar system",
                     "strings does a guitar have", "minutes are in a day"],
    "Translate '{}.": ["good evening' into French", "thank you' into Spanish", "dog' into German",
                      "please' into Italian", "house' into Spanish", "goodbye' into French"],
    "Name {}.": ["a reptile", "a fruit that grows on trees", "a famous scientist", "a type of cloud",
                 "a country in South America", "a color of the rainbow", "a woodwind instrument",
                 "a Greek god", "a winter sport", "a metal"],
    "Who wrote {}?": ["Macbeth", "Moby-Dick", "The Divine Comedy", "Frankenstein", "Oliver Twist",
                      "The Little Prince"],
    "Who painted {}?": ["The Last Supper", "Water Lilies", "The Night Watch", "The Persistence of Memory"],
    "Who invented {}?": ["the telephone", "the light bulb", "the printing press", "the airplane"],
    "What is {}? Answer in one sentence.": ["a pronoun", "a molecule", "an island", "gravity on the moon",
                                            "a fraction", "a mammal", "a metaphor", "a desert"],
    "What is the chemical symbol for {}?": ["copper", "lead", "hydrogen", "potassium", "calcium"],
    "What language is spoken in {}?": ["Portugal", "Japan", "Iran", "the Netherlands", "Greece"],
    "What is the currency of {}?": ["Canada", "China", "Brazil", "South Africa"],
    "What is the {} planet from the Sun?": ["closest", "hottest", "smallest", "farthest"],
    "What is the largest {}?": ["continent", "bird", "lake in Africa", "bone in the human body"],
    "What does {} stand for?": ["GPS", "PDF", "WHO", "ATM", "FAQ"],
    "What does a {} measure?": ["barometer", "ruler", "scale", "speedometer", "clock"],
    "What is the boiling point of {}?": ["ethanol", "milk", "olive oil"],
    "What color do you get by mixing {}?": ["red and white", "red and blue", "red and yellow", "black and white"],
    "How many legs does {} have?": ["a dog", "an ant", "a crab", "an octopus", "a bird"],
    "What do {} make?": ["spiders", "silkworms", "cows", "beavers"],
    "Name the {} month of the year.": ["last", "third", "sixth", "ninth"],
    "Give one tip for {}.": ["drinking more water", "studying for a test",
                             "keeping a plant alive", "running faster"],
    "Write {}.": ["a haiku about a mountain", "one sentence about winter", "a haiku about the wind",
                  "one sentence about the sea", "a short poem about the sun"],
    "Suggest a name for {}.": ["a pet rabbit", "a coffee shop", "a sailboat", "a parrot"],
    "List two {}.": ["vegetables that are green", "animals that can fly", "countries in Europe",
                     "things that are hot", "fruits that are orange"],
    "Why do {}?": ["we need sleep", "stars twinkle", "ice cubes float", "dogs wag their tails"],
    "What is the main function of {}?": ["the lungs", "the kidneys", "the brain", "a root"],
    "Explain {} in one sentence.": ["a rainbow", "an earthquake", "digestion"],
    "Which animal {}?": ["has black and white stripes", "can change its color", "sleeps upside down",
                         "is the largest on Earth"],
    "What is the tallest {}?": ["mountain in the world", "building in the world", "tree species"],
    "What gas do {}?": ["humans breathe out", "we need to breathe", "balloons often contain"],
}


def distill_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` general prompts for self-distillation: short questions and the replay tasks, shuffled; then
    SHORT_TEMPLATES_TO_406's, shuffled; then SHORT_TEMPLATES_TO_582's, shuffled."""
    def filled(templates: dict[str, list[str]]) -> list[str]:
        return [template.format(item) for template, items in templates.items() for item in items]

    prompts = filled(SHORT_TEMPLATES) + [t.format(topic=topic) for t in REPLAY_TASKS for topic in REPLAY_TOPICS]
    random.Random(seed + 2).shuffle(prompts)
    more = filled(SHORT_TEMPLATES_TO_406)
    random.Random(seed + 3).shuffle(more)
    extra = filled(SHORT_TEMPLATES_TO_582)
    random.Random(seed + 4).shuffle(extra)
    return (prompts + more + extra)[:count]
