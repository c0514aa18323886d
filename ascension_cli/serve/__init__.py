"""``ascension serve``: the HTTP service over a catalogue and the page it shows."""
