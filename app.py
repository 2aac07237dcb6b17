"""Entry point: ``python app.py`` (locally or as a Hugging Face Space) starts the Assistant Axis Lab.

Host and port follow GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; see app/settings.py for the AXIS_LAB_* variables.
"""
from app.main import build_demo, launch

demo = build_demo()

if __name__ == "__main__":
    launch(demo)
