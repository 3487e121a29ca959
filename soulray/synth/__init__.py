"""Strategy-annotated role-play synthesis: Seeker, Strategy Counselor and Supporter."""
