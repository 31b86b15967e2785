"""Passkey retrieval: does a (sparse) model still find a 5-digit key stated once, deep in filler text?"""
