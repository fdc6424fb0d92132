"""The words of the synthetic set: questions (English and Chinese, several
phrasings each), option texts, and one-sentence descriptions.

Answer keys are language-neutral ("left", "2", "ct"); ANSWER_TEXT maps them to
the option text shown in each language.
"""
from __future__ import annotations

MODALITY_NAMES = {
    "en": {"xray": "Chest X-ray", "ct": "CT", "mri": "MRI", "ultrasound": "Ultrasound",
           "histology": "Histopathology"},
    "zh": {"xray": "胸部X线", "ct": "CT", "mri": "磁共振", "ultrasound": "超声", "histology": "病理切片"},
}

# kind -> option keys in their canonical order
KIND_OPTIONS = {
    "modality": ("xray", "ct", "mri", "ultrasound", "histology"),
    "presence": ("yes", "no"),
    "count": ("0", "1", "2", "3"),
    "side": ("left", "right"),
    "vertical": ("upper", "lower"),
    "size": ("small", "large"),
}

ANSWER_TEXT = {
    "en": {**MODALITY_NAMES["en"], "yes": "Yes", "no": "No", "left": "Left", "right": "Right",
           "upper": "Upper", "lower": "Lower", "small": "Small", "large": "Large",
           **{str(n): str(n) for n in range(4)}},
    "zh": {**MODALITY_NAMES["zh"], "yes": "是", "no": "否", "left": "左侧", "right": "右侧",
           "upper": "上部", "lower": "下部", "small": "小", "large": "大",
           **{str(n): str(n) for n in range(4)}},
}

QUESTIONS = {
    "modality": {
        "en": ("What imaging modality is shown in this image?", "Which type of medical image is this?",
               "What kind of examination produced this image?"),
        "zh": ("这张图像是哪种成像方式？", "这是哪一类医学图像？", "该图像来自哪种检查？"),
    },
    "presence": {
        "en": ("Is there a lesion in this image?", "Does this image show any abnormality?",
               "Is any lesion visible?"),
        "zh": ("图像中是否有病灶？", "这张图像是否显示异常？", "能看到病变吗？"),
    },
    "count": {
        "en": ("How many lesions are visible?", "How many lesions can be seen in the image?",
               "What is the number of lesions?"),
        "zh": ("图像中可见几个病灶？", "病灶的数量是多少？", "一共有多少个病变？"),
    },
    "side": {
        "en": ("On which side of the image is the lesion?", "Which side of the image shows the abnormality?",
               "Is the lesion on the left or the right side of the image?"),
        "zh": ("病灶位于图像的哪一侧？", "异常出现在图像的哪一边？", "病灶在图像左侧还是右侧？"),
    },
    "vertical": {
        "en": ("Is the lesion in the upper or the lower part?", "Where is the lesion located vertically?",
               "Is the abnormality in the upper or the lower half of the organ?"),
        "zh": ("病灶位于上部还是下部？", "病变在上半部分还是下半部分？", "异常位于器官的上部还是下部？"),
    },
    "size": {
        "en": ("Is the lesion small or large?", "How large is the lesion?", "What is the size of the lesion?"),
        "zh": ("病灶是小还是大？", "病变的大小如何？", "病灶的尺寸是？"),
    },
}

DESCRIBE_QUESTIONS = {
    "en": ("Describe this image.", "What does this image show?", "Please describe the findings."),
    "zh": ("请描述这张图像。", "这张图像显示了什么？", "请描述影像所见。"),
}

_BODY_ZH = {"chest": "胸部", "brain": "脑部", "abdomen": "腹部", "tissue": "组织"}
_COUNT_EN = {1: "one", 2: "two", 3: "three"}


def describe(case: dict, lang: str) -> str:
    """One or two sentences stating modality, body part and every finding."""
    findings = case["findings"]
    modality = MODALITY_NAMES[lang][case["modality"]]
    if lang == "zh":
        head = f"{modality}图像，{_BODY_ZH[case['body_part']]}。"
        if not findings["count"]:
            return head + "未见病灶。"
        where = ANSWER_TEXT["zh"][findings["side"]] + ANSWER_TEXT["zh"][findings["vertical"]]
        return head + f"图像{where}可见{findings['count']}个{ANSWER_TEXT['zh'][findings['size']]}病灶。"
    head = f"{modality} image of the {case['body_part']}."
    if not findings["count"]:
        return head + " No lesion is seen."
    count = findings["count"]
    noun = "lesion" if count == 1 else "lesions"
    verb = "is" if count == 1 else "are"
    return (head + f" There {verb} {_COUNT_EN[count]} {findings['size']} {noun} in the "
            f"{findings['vertical']} {findings['side']} part of the image.")
