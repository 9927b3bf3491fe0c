"""AVE: audio-visual event localisation with anchored token allocation."""
