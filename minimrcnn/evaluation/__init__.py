"""COCO evaluation: pycocotools as the judge, and a readable implementation of COCO AP."""
