"""A GPT pretraining pipeline grown from chapter 5 of Raschka's
"Build a Large Language Model (From Scratch)": prepare -> train -> evaluate -> export -> generate.
"""

__version__ = "0.1.0"
