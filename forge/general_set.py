"""The general set Forge ships to measure forgetting: everyday questions with short reference answers, and a
few paragraphs of plain prose. Written for Forge. A fine-tune is measured on it beside the base model: the
share of questions still answered as well as the base answered them, the share of answers that end on
their own, and the perplexity change on the prose. Nothing here is trained on.

Each question has the accepted answers (any one counts); answers are matched after normalising (lower case,
no punctuation, no articles), so "Paris." and "It is Paris" both answer "Paris".
"""

from __future__ import annotations

QUESTIONS: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What is 2 + 2?", ["four", "4"]),
    ("What is 10 minus 3?", ["seven", "7"]),
    ("What colour is the sky on a clear day?", ["blue"]),
    ("What colour is grass?", ["green"]),
    ("Which planet do we live on?", ["Earth"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What do bees make?", ["honey"]),
    ("What is frozen water called?", ["ice"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "CO2"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What is the opposite of hot?", ["cold"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("What is the boiling point of water in degrees Celsius?", ["100", "one hundred"]),
    ("Which month comes after January?", ["February"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("In which continent is Egypt?", ["Africa"]),
    ("What do you call a baby cat?", ["kitten"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
]

PROSE: list[str] = [
    "The market opens early on Saturdays. Farmers arrive before dawn, unload crates of apples, potatoes and "
    "bread, and set up their stalls under striped awnings. By eight o'clock the square is full of people "
    "carrying baskets, comparing prices and greeting neighbours they have not seen all week. Children wait "
    "in line for warm pastries while their parents talk about the weather and the harvest.",
    "Rivers shape the land they cross. Over thousands of years, moving water wears down rock, carries sand "
    "and gravel downstream and drops them where the current slows. Wide valleys, steep canyons and fertile "
    "plains are all made this way. Many of the world's oldest cities were built beside rivers, because the "
    "water gave people something to drink, a way to travel and soil good enough to grow food.",
    "Learning to ride a bicycle takes patience. At first the bicycle seems to fall over the moment it stops "
    "moving, and every turn feels uncertain. With practice, the rider learns to keep a steady speed, to look "
    "ahead instead of down at the wheel, and to lean gently into each corner. After a few days the balance "
    "that seemed impossible becomes something the body does without thinking.",
    "A good cup of tea depends on a few simple things. The water should be fresh and brought just to the "
    "boil. Black tea needs the hottest water and about four minutes to steep, while green tea prefers water "
    "that has cooled a little and a shorter time. Milk, sugar or lemon are a matter of taste, and in many "
    "homes the way tea is made is a small tradition passed from one generation to the next.",
    "The library was quiet in the afternoon. Sunlight came through the tall windows and fell across long "
    "wooden tables where students read and took notes. A librarian pushed a cart of returned books along the "
    "shelves, putting each one back in its place. Near the entrance, an old man turned the pages of a "
    "newspaper slowly, as if he had all the time in the world.",
]
