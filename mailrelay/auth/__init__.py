"""Cred: checkers for passwords and networks, the realm that makes avatars."""
