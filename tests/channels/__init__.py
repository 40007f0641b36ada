"""Tests of the delivery channels: mailers and templates."""
