"""Text pairs that exercise the tokenizer and the model: scripts, normalisation, whitespace, length."""

LONG = "The giant panda lives in the mountains of central China and eats bamboo. " * 60

PAIRS = [
    ("what is panda?", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."),
    ("what is panda?", "hi"),
    ("query", "passage"),
    ("熊猫是什么？", "熊猫是一种生活在中国的熊，主要吃竹子。"),
    ("ما هو الباندا؟", "الباندا حيوان يعيش في الصين ويأكل الخيزران"),
    ("🐼 panda 🐼", "🚀🐱 emoji only 🐼🐼🐼"),
    (
        "ｆｕｌｌｗｉｄｔｈ ﬁ ①",
        "NFKC: Ａ ﬁnal ② café cafe\u0301",
    ),  # fullwidth, ligature, circled digit, combining accent
    ("  leading and trailing  ", "\ttabs\nnewlines\r\n  and   runs   of spaces  "),
    ("zero\u200bwidth and\u00a0nbsp", "soft\u00adhyphen \u3000ideographic space"),
    ("Привет мир", "γεια σου κόσμε नमस्ते दुनिया 東京 日本語の猫です 한국어 고양이"),
    ("special <s> tokens </s> typed", "a literal <pad> and <mask> in the text"),  # attended, like transformers
    ("a", ""),  # FlagReranker allows an empty passage
    ("short query", LONG),  # far beyond max_length: the passage is cut
    (LONG, "short passage"),  # a long query: each policy cuts differently
    (LONG, LONG),
]
