"""The crisis screen: a lexicon override plus a learned classifier, in Chinese and English.

- lexicon.py: phrases and regexes (data/lexicon.json); a match always flags.
- features.py / classifier.py: e5 sentence embedding + hashed character n-grams, one logistic
  head per category (suicide, self_harm, violence, abuse), weights in data/weights.npz.
- dataset.py / train.py: the hand-written training set and deterministic retraining.
- screen.py: what serving calls: every user message, the model's reply, help lines per
  category and language (data/helplines.json).
Imports nothing from soulray.serve: serve's response schema takes this package's Assessment.
"""
