"""Tool calling: rendering tools into prompts, reading calls out of text, forcing calls with a grammar."""
