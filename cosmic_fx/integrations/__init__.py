"""Integrations with the training loops people already use. Import the one you need
(``cosmic_fx.integrations.hf`` for the Hugging Face ``Trainer``); nothing in cosmic_fx imports them, so
their frameworks are needed only by those who use them.
"""
