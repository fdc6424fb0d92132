"""Multi-turn conversations in upstream's history format.

Earlier turns render as `<|user|>\n{images}{q}\n<|assistant|>\n{a} \n`; every
image of the conversation stays spliced at its own placeholder (≤ 6 in all)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .families.llava import MAX_IMAGES
from .errors import PromptError
from .prompt import Turn


@dataclass
class ChatSession:
    """Keeps the turns and images of one conversation with a model."""

    model: object                       # api.HuatuoVision
    turns: list = field(default_factory=list)
    images: list = field(default_factory=list)
    pending_images: list = field(default_factory=list)

    def add_image(self, image) -> None:
        """Attach an image to the next question."""
        if len(self.images) + len(self.pending_images) >= MAX_IMAGES:
            raise PromptError(f"A conversation holds at most {MAX_IMAGES} images; /reset to start a new one.")
        self.pending_images.append(image)

    def ask(self, question: str, images=(), **gen):
        """Answer the next question; the answer joins the history."""
        for image in images:
            self.add_image(image)
        return self._finish(question, self._start(question, gen))

    def stream(self, question: str, images=(), **gen):
        """Yield the next answer's text as it comes; the answer joins the history.
        Closed early (the chat's Ctrl-C), it adds no turn and the pending images stay pending."""
        for image in images:
            self.add_image(image)
        with self.model.lock:
            generation = self._start(question, gen)
            yield from generation
        self._finish(question, generation)

    def reset(self) -> None:
        self.turns, self.images, self.pending_images = [], [], []

    def _start(self, question, gen):
        return self.model.generation(self.pending_images, question, history=self.turns,
                                     history_images=self.images, **gen)

    def _finish(self, question, generation):
        if generation.answer is None:           # ask(): run it to the end
            with self.model.lock:
                for _ in generation:
                    pass
        answer = generation.answer
        self.turns.append(Turn(question=question, n_images=len(self.pending_images), answer=answer.text))
        self.images += self.pending_images
        self.pending_images = []
        return answer
